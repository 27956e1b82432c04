//! A shared page store (papers 000 and 004): a content-addressed directory both hosts can reach
//! (an NFS or cluster file system mount), holding pages of images of VMs of the same
//! application. A destination offers it as content it already holds
//! ([`memferry::hashfirst::ContentSource`]): the source then sends pages found there as hashes
//! and the destination fetches their bytes from the store instead of over the link.
//!
//! Layout: `DIR/xx/<32 hex digits>`, one file of exactly one page per distinct content, named by
//! its xxh3-128 hash (unkeyed: it only names the file; every use checks content under the
//! migration's own keyed hash). The two-digit subdirectory is the hash's first byte, so no
//! directory grows past a few thousand entries. Writes go to a temporary name and are renamed
//! into place, so a reader never sees half a page; adding content that is already there does
//! nothing.
//!
//! A page whose file no longer hashes to its name was updated elsewhere (paper 003's first keep
//! rule: such a page cannot be reused): it is not offered (it reads as zero, which a hash-first
//! destination never announces) and is counted ([`PageStore::changed_pages`]).

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use memferry::error::HostError;
use memferry::hashfirst::ContentSource;
use xxhash_rust::xxh3::xxh3_128;

/// A content-addressed page store in a directory.
pub struct PageStore {
    dir: PathBuf,
    page_size: usize,
    /// The pages listed when the store was opened, for [`ContentSource`], with the hash their
    /// name says they hold.
    listed: Vec<(PathBuf, u128)>,
    /// Listed pages found not to hold the content their name says.
    changed: u64,
}

impl PageStore {
    /// Opens (creating it if needed) the store in `dir` for pages of `page_size` bytes.
    pub fn open(dir: impl AsRef<Path>, page_size: usize) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        let mut store = PageStore {
            dir,
            page_size,
            listed: Vec::new(),
            changed: 0,
        };
        store.relist()?;
        Ok(store)
    }

    /// Lists the store's pages again (after others added some).
    pub fn relist(&mut self) -> io::Result<()> {
        let mut listed = Vec::new();
        for sub in fs::read_dir(&self.dir)? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(sub.path())? {
                let file = file?;
                let name = file.file_name();
                let name = name.to_string_lossy();
                // Only finished pages: 32 hex digits, exactly one page long.
                let hash = (name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit()))
                    .then(|| u128::from_str_radix(&name, 16).ok())
                    .flatten();
                if let Some(hash) = hash {
                    if file.metadata()?.len() == self.page_size as u64 {
                        listed.push((file.path(), hash));
                    }
                }
            }
        }
        listed.sort();
        self.listed = listed;
        Ok(())
    }

    fn path_of(&self, hash: u128) -> PathBuf {
        let name = format!("{hash:032x}");
        self.dir.join(&name[..2]).join(name)
    }

    /// Adds `page` (one page); returns whether it was new. Zero pages are not stored (they
    /// travel as a header only anyway).
    pub fn put(&mut self, page: &[u8]) -> io::Result<bool> {
        if page.len() != self.page_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a page of {} bytes in a store of {}-byte pages",
                    page.len(),
                    self.page_size
                ),
            ));
        }
        if memferry::codec::is_zero_page(page) {
            return Ok(false);
        }
        let path = self.path_of(xxh3_128(page));
        if path.exists() {
            return Ok(false);
        }
        let parent = path.parent().expect("a subdirectory");
        fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".tmp-{}-{:x}", std::process::id(), xxh3_128(page)));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(page)?;
        file.sync_data()?;
        fs::rename(&tmp, &path)?;
        self.listed.push((path, xxh3_128(page)));
        Ok(true)
    }

    /// Adds every page of `memory` (whole pages); returns how many were new.
    pub fn put_all(&mut self, memory: &[u8]) -> io::Result<u64> {
        let mut added = 0;
        for page in memory.chunks_exact(self.page_size) {
            added += self.put(page)? as u64;
        }
        Ok(added)
    }

    /// Distinct pages in the store (as listed).
    pub fn len(&self) -> usize {
        self.listed.len()
    }

    /// Listed pages read so far whose file no longer holds the content its name says (updated
    /// elsewhere): they were offered as zero, that is, not at all.
    pub fn changed_pages(&self) -> u64 {
        self.changed
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }
}

impl ContentSource for PageStore {
    fn page_count(&self) -> u64 {
        self.listed.len() as u64
    }

    fn read_content(&mut self, index: u64, buf: &mut [u8]) -> Result<(), HostError> {
        let (path, hash) = self
            .listed
            .get(index as usize)
            .ok_or_else(|| HostError::new("no such page in the store"))?;
        let data = fs::read(path)
            .map_err(|e| HostError::new(format!("store page {}: {e}", path.display())))?;
        if data.len() != buf.len() {
            return Err(HostError::new(format!(
                "store page {} is {} bytes, not one page",
                path.display(),
                data.len()
            )));
        }
        if xxh3_128(&data) == *hash {
            buf.copy_from_slice(&data);
        } else {
            // Updated elsewhere since it was stored: not the content its name promises.
            buf.fill(0);
            self.changed += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
            .collect()
    }

    #[test]
    fn stores_each_content_once_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("memferry-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut store = PageStore::open(&dir, 4096).unwrap();
        assert!(store.put(&page(3)).unwrap());
        assert!(!store.put(&page(3)).unwrap(), "stored twice");
        assert!(!store.put(&[0u8; 4096]).unwrap(), "zero page stored");
        assert!(store.put(&page(5)).unwrap());
        assert!(store.put(&[1u8; 10]).is_err());
        // A stray file of the wrong size, and a half-written temporary, are not listed.
        fs::write(dir.join("ab").join("0".repeat(32)), b"short").ok();
        fs::create_dir_all(dir.join("ab")).unwrap();
        fs::write(dir.join("ab").join("1".repeat(32)), b"short").unwrap();
        fs::write(dir.join("ab").join(".tmp-1-2"), page(9)).unwrap();
        let mut again = PageStore::open(&dir, 4096).unwrap();
        assert_eq!(again.len(), 2);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        for i in 0..again.page_count() {
            again.read_content(i, &mut buf).unwrap();
            got.push(buf.clone());
        }
        got.sort();
        let mut want = vec![page(3), page(5)];
        want.sort();
        assert_eq!(got, want);
        assert!(again.read_content(2, &mut buf).is_err());
        // A page rewritten behind the store's back is not offered (reads as zero), and counted.
        let name = format!("{:032x}", xxh3_128(&page(5)));
        fs::write(dir.join(&name[..2]).join(&name), page(7)).unwrap();
        let mut changed = PageStore::open(&dir, 4096).unwrap();
        let mut offered = Vec::new();
        for i in 0..changed.page_count() {
            changed.read_content(i, &mut buf).unwrap();
            offered.push(buf.clone());
        }
        assert!(offered.contains(&page(3)));
        assert!(!offered.contains(&page(7)) && !offered.contains(&page(5)));
        assert_eq!(changed.changed_pages(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
