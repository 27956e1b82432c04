//! Memory reuse on return (paper 003) with its two keep rules (`memferry_std::image::KeepRules`):
//! a page the rules drop (likely to be updated soon, or updated elsewhere) is never announced as
//! held content, so never trusted; and a VM returning to the host that kept its image sends
//! every kept, unchanged page as a hash and nothing else as one, and arrives whole.

#![cfg(all(unix, feature = "cli"))]

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use memferry::bitmap::DirtyBitmap;
use memferry::codec::dedup::ContentHasher;
use memferry::error::HostError;
use memferry::hashfirst::ContentIndex;
use memferry::memory::PageRead;
use memferry::page::{MemoryLayout, PageIndex, PageSize, Region};
use memferry::strategy::PreCopyConfig;
use memferry::time::ByteRate;
use memferry_std::demo::{self, GuestOptions, SourceOptions, TransportKind};
use memferry_std::image::{keep_path, Image, KeepRules, KeptImage, Limits};
use proptest::prelude::*;

const PAGE: usize = 4096;

/// A directory of its own under the system's temp directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memferry-reuse-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Guest memory as a list of pages.
#[derive(Clone)]
struct Pages(Vec<Vec<u8>>);

impl PageRead for Pages {
    fn read_page(&mut self, page: PageIndex, buf: &mut [u8]) -> Result<(), HostError> {
        buf.copy_from_slice(&self.0[page.0 as usize]);
        Ok(())
    }
}

/// A page derived from `seed`: 0 is the zero page, every other seed a distinct non-zero page.
fn page(seed: u64) -> Vec<u8> {
    if seed == 0 {
        return vec![0; PAGE];
    }
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(PAGE);
    while out.len() < PAGE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn bitmap(len: u64, set: &[bool]) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(len);
    for (i, _) in set.iter().enumerate().filter(|(_, &on)| on) {
        b.set(i as u64);
    }
    b
}

fn rules() -> impl Strategy<Value = KeepRules> {
    (any::<bool>(), any::<bool>()).prop_map(|(drop_hot, drop_updated)| KeepRules {
        drop_hot,
        drop_updated,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The announced set is exactly the keyed hashes of the pages the rules keep: a page that
    /// was hot at departure, was rewritten in the image after it, or was named as updated
    /// elsewhere is never announced (unless a kept page holds the same content), whatever the
    /// contents (zero pages and duplicates included) and the rules.
    #[test]
    fn dropped_pages_are_never_announced(
        // Per page: content at departure (small seeds make duplicates and zero pages), hot at
        // departure, rewritten in the image after departure (new content seed, 0: not), named
        // as updated elsewhere.
        pages in prop::collection::vec((0u64..12, any::<bool>(), 0u64..20, any::<bool>()), 1..40),
        rules in rules(),
        session in any::<u64>(),
    ) {
        let dir = TempDir::new("prop");
        let path = dir.0.join("vm.img");
        let n = pages.len() as u64;
        let layout = MemoryLayout::single(
            memferry::page::Geometry::new(PageSize::DEFAULT, n).unwrap(),
        );
        let departed = Pages(pages.iter().map(|p| page(p.0)).collect());
        let mut image = Image::create(&path, &layout).unwrap();
        image.save_full(&mut departed.clone()).unwrap();
        let hot: Vec<bool> = pages.iter().map(|p| p.1).collect();
        let at_departure = image.keep_for_reuse(&bitmap(n, &hot), rules).unwrap();
        prop_assert_eq!(
            at_departure.kept + at_departure.zero + at_departure.dropped_hot,
            n
        );
        // After departure, some pages of the image are rewritten (the image saved again).
        let mut now = departed.clone();
        let rewritten: Vec<bool> = pages.iter().map(|p| p.2 != 0).collect();
        for (i, p) in pages.iter().enumerate() {
            if p.2 != 0 {
                now.0[i] = page(100 + p.2);
            }
        }
        image.save_incremental(&bitmap(n, &rewritten), &mut now.clone()).unwrap();
        drop(image);
        let noted: Vec<bool> = pages.iter().map(|p| p.3).collect();
        let mut kept = KeptImage::open(&path, Limits::default()).unwrap();
        prop_assert_eq!(kept.rules(), rules);
        kept.note_updated_elsewhere(&bitmap(n, &noted)).unwrap();
        let stats = kept.stats_handle();
        let index = ContentIndex::build(Box::new(kept), session, PAGE).unwrap();
        let announced: HashSet<u128> = index.hashes().collect();

        // The model of the two rules.
        let zero = |p: &[u8]| p.iter().all(|&b| b == 0);
        let hasher = ContentHasher::new(session);
        let offered = |i: usize| {
            let hot_drop = rules.drop_hot && hot[i] && !zero(&departed.0[i]);
            let updated_drop =
                rules.drop_updated && (noted[i] || now.0[i] != departed.0[i]);
            !zero(&now.0[i]) && !hot_drop && !updated_drop
        };
        let expected: HashSet<u128> = (0..pages.len())
            .filter(|&i| offered(i))
            .map(|i| hasher.hash(&now.0[i]))
            .collect();
        prop_assert_eq!(&announced, &expected);
        for i in (0..pages.len()).filter(|&i| !offered(i)) {
            let h = hasher.hash(&now.0[i]);
            let same_as_kept = (0..pages.len()).any(|j| offered(j) && now.0[j] == now.0[i]);
            prop_assert!(same_as_kept || !announced.contains(&h), "dropped page {} announced", i);
        }
        let s = *stats.lock().unwrap();
        prop_assert_eq!(s.kept + s.zero + s.dropped_hot + s.dropped_updated, n);
        if rules.drop_updated {
            prop_assert_eq!(s.kept, (0..pages.len()).filter(|&i| offered(i)).count() as u64);
        }
        if !rules.drop_hot {
            prop_assert_eq!(s.dropped_hot, 0);
        }
        if !rules.drop_updated {
            prop_assert_eq!(s.dropped_updated, 0);
        }
    }
}

/// A keep map that is damaged, or that belongs to another image, is refused with an error (the
/// image is not offered on a map it cannot trust); an image without one offers every page.
#[test]
fn a_damaged_or_foreign_keep_map_is_refused() {
    let dir = TempDir::new("damaged");
    let path = dir.0.join("vm.img");
    let layout = MemoryLayout::new(
        PageSize::DEFAULT,
        vec![Region {
            id: 0,
            guest_base: 0,
            pages: 8,
        }],
    )
    .unwrap();
    let mut memory = Pages((0..8).map(page).collect());
    let mut image = Image::create(&path, &layout).unwrap();
    image.save_full(&mut memory).unwrap();
    drop(image);
    let all = KeptImage::open(&path, Limits::default()).unwrap();
    assert_eq!(all.stats().kept, 7, "no keep map: every page with data");
    assert_eq!(all.stats().zero, 1);
    drop(all);
    let image = Image::open(&path).unwrap();
    let mut hot = DirtyBitmap::new(8);
    hot.set(3);
    let stats = image.keep_for_reuse(&hot, KeepRules::PAPER).unwrap();
    assert_eq!((stats.kept, stats.dropped_hot, stats.zero), (6, 1, 1));
    drop(image);
    let map = keep_path(&path);
    let good = fs::read(&map).unwrap();
    let mut bad = good.clone();
    bad[80] ^= 1;
    fs::write(&map, &bad).unwrap();
    let err = KeptImage::open(&path, Limits::default()).err().unwrap();
    assert!(err.to_string().contains("checksum"), "{err}");
    fs::write(&map, &good[..good.len() - 1]).unwrap();
    assert!(KeptImage::open(&path, Limits::default()).is_err());
    // A new image at the same path removes the old one's map.
    fs::write(&map, &good).unwrap();
    let other = Image::create(&path, &layout).unwrap();
    drop(other);
    assert!(!map.exists());
    fs::write(&map, &good).unwrap();
    let err = KeptImage::open(&path, Limits::default()).err().unwrap();
    assert!(err.to_string().contains("another image"), "{err}");
}

/// A VM returns to the host that kept its image, over the real driver: with the rules on,
/// every page the rules kept and the VM did not change goes as a hash, every other page in
/// full (the hot pages dropped at departure too, even those that did not change: that is the
/// rule's price), and the destination's memory equals the source's. With every page kept, the
/// hot pages that did not change go as hashes as well, and more hashes are announced.
#[test]
fn a_returning_vm_sends_only_what_the_kept_image_lacks() {
    let guest = GuestOptions {
        memory: 4 << 20,
        zero_fraction: 0.1,
        workload: None,
        ..GuestOptions::default()
    };
    let seed = 11;
    let source = demo::prepare_source(&guest, seed).unwrap();
    let returning: Vec<Vec<u8>> = source
        .region()
        .snapshot()
        .chunks(PAGE)
        .map(|p| p.to_vec())
        .collect();
    drop(source);
    let n = returning.len() as u64;
    let zero = |p: &[u8]| p.iter().all(|&b| b == 0);
    // What the VM left behind: its memory then. Since, it changed every 7th page elsewhere
    // (the returning memory differs there); every 5th page was hot at departure; every 11th
    // page of the image was rewritten after departure.
    let mut departed = returning.clone();
    for (i, p) in departed.iter_mut().enumerate() {
        if i % 7 == 0 {
            *p = page(1_000 + i as u64);
        }
    }
    let hot: Vec<bool> = (0..n).map(|i| i % 5 == 0).collect();
    let rewritten: Vec<bool> = (0..n).map(|i| i % 11 == 0).collect();
    let mut now = departed.clone();
    for (i, p) in now.iter_mut().enumerate() {
        if i % 11 == 0 {
            *p = page(5_000 + i as u64);
        }
    }
    let returning_nonzero = returning.iter().filter(|p| !zero(p)).count() as u64;

    let run = |rules: KeepRules| {
        let dir = TempDir::new("return");
        let path = dir.0.join("vm.img");
        let layout =
            MemoryLayout::single(memferry::page::Geometry::new(PageSize::DEFAULT, n).unwrap());
        let mut image = Image::create(&path, &layout).unwrap();
        image.save_full(&mut Pages(departed.clone())).unwrap();
        image.keep_for_reuse(&bitmap(n, &hot), rules).unwrap();
        image
            .save_incremental(&bitmap(n, &rewritten), &mut Pages(now.clone()))
            .unwrap();
        drop(image);
        let outcome = demo::run_demo_with(
            &guest,
            seed,
            PreCopyConfig::default(),
            ByteRate::UNLIMITED,
            TransportKind::Loopback,
            1,
            &SourceOptions::default(),
            Some(path.clone()),
            |_| {},
        )
        .unwrap();
        // What the rules offer: the image's content now, page by page.
        let offered: HashSet<&Vec<u8>> = (0..n as usize)
            .filter(|&i| {
                let hot_drop = rules.drop_hot && hot[i] && !zero(&departed[i]);
                let updated_drop = rules.drop_updated && now[i] != departed[i];
                !zero(&now[i]) && !hot_drop && !updated_drop
            })
            .map(|i| &now[i])
            .collect();
        let expected_known = returning
            .iter()
            .filter(|p| !zero(p) && offered.contains(p))
            .count() as u64;
        (outcome, offered.len() as u64, expected_known)
    };

    let (on, on_offered, on_known) = run(KeepRules::PAPER);
    let (all, all_offered, all_known) = run(KeepRules::KEEP_ALL);
    for (o, offered, known) in [(&on, on_offered, on_known), (&all, all_offered, all_known)] {
        let r = &o.report;
        assert_eq!(r.verified, Some(true), "the destination's memory differs");
        assert_eq!(r.source_digest, r.destination_digest);
        assert_eq!(r.known_pages_announced, offered);
        assert_eq!(
            r.encodings.known.pages, known,
            "hashes for kept, unchanged pages only"
        );
        // No workload: one pass, every non-zero page once, as a hash or in full.
        assert_eq!(r.encodings.raw.pages, returning_nonzero - known);
        assert_eq!(r.pages_resent(), 0);
    }
    let reuse = on.reuse.expect("a kept image reports its figures");
    assert!(
        reuse.dropped_hot > 0 && reuse.dropped_updated > 0,
        "{reuse:?}"
    );
    assert_eq!(reuse.kept, on_offered);
    assert_eq!(
        reuse.kept + reuse.zero + reuse.dropped_hot + reuse.dropped_updated,
        n
    );
    // The rules drop pages that would have matched (hot but unchanged) and announce fewer.
    assert!(on_offered < all_offered);
    assert!(on_known < all_known);
    eprintln!(
        "{n} pages, {returning_nonzero} non-zero: rules on: {on_offered} announced, {on_known} \
         as hashes, {} B sent; every page kept: {all_offered} announced, {all_known} as hashes, \
         {} B sent",
        on.report.bytes_sent, all.report.bytes_sent
    );
}

fn memferry_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memferry"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// `memferry save --keep` records what is worth keeping and says why the rest is not; `demo
/// --content` applies it and reports the same figures beside the migration, which arrives
/// whole.
#[test]
fn save_keeps_by_the_rules_and_demo_reports_them() {
    let dir = TempDir::new("cli");
    let image = dir.0.join("vm.img");
    let image = image.to_str().unwrap();
    let common = ["--memory", "16MiB", "--seed", "5"];
    for keep in ["rules", "all"] {
        let mut args = vec![
            "save",
            "-o",
            image,
            "--incremental",
            "2",
            "--interval",
            "30ms",
        ];
        args.extend_from_slice(&common);
        args.extend_from_slice(&["--keep", keep, "--json"]);
        let saved = memferry_json(&args);
        let k = &saved["keep"];
        assert_eq!(k["rules"], keep);
        let n = |f: &str| k[f].as_u64().unwrap();
        assert_eq!(n("pages"), 4096);
        assert_eq!(
            n("kept") + n("zero") + n("dropped_hot") + n("dropped_updated"),
            4096
        );
        assert_eq!(
            n("dropped_updated"),
            0,
            "nothing is updated elsewhere at departure"
        );
        if keep == "all" {
            assert_eq!(n("dropped_hot"), 0);
        } else {
            // The workload writes 90% of its writes to a hot 5% of memory: they were dirtied
            // in both of the last two intervals.
            assert!(n("dropped_hot") > 0, "{k}");
        }
        let mut args = vec![
            "demo",
            "--guest",
            "process",
            "--json",
            "--quiet",
            "--bandwidth",
            "400Mbit",
            "--content",
            image,
        ];
        args.extend_from_slice(&common);
        let back = memferry_json(&args);
        assert_eq!(back["verified"], true);
        assert_eq!(back["reuse"]["rules"], keep);
        assert_eq!(back["reuse"]["dropped_hot"], k["dropped_hot"]);
        let kept = back["reuse"]["kept"].as_u64().unwrap();
        assert!(back["known_pages_announced"].as_u64().unwrap() <= kept);
        assert!(back["encodings"]["known"]["pages"].as_u64().unwrap() > 0);
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_memferry"))
        .args(["save", "-o", image, "--keep", "some"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown keep rules"));
}
