//! A vCPU on its own thread, which a migration can pause (and time), resume and read or write
//! the state of.
//!
//! Pausing kicks the thread out of `KVM_RUN` with a signal whose handler sets the `kvm_run`
//! page's `immediate_exit` (so a signal that arrives just before the thread enters `KVM_RUN`
//! is not lost: the ioctl returns `EINTR` at once), and the thread parks on a condition
//! variable until it is resumed. [`VcpuThread::pause`] returns when the thread is parked, and
//! says how long that took: the pause is part of the downtime. The same pause in two steps,
//! for a caller that must not block: [`VcpuThread::request_pause`] signals the thread and
//! returns at once, [`VcpuThread::parked_at`] says (without waiting) whether and when it
//! parked, and [`VcpuThread::resume`] cancels a request the thread has not acted on yet.
//!
//! A throttle ([`VcpuThread::set_throttle`], QEMU's auto-converge) takes a share of every
//! [`THROTTLE_PERIOD`] away from the guest: a timer thread kicks the vCPU out of `KVM_RUN` when
//! its share of the period has run, and the vCPU thread sleeps out the rest outside `KVM_RUN`.
//!
//! The thread ends when the guest writes to its done port ([`super::guest::DONE_MMIO`]), on any
//! other exit it cannot handle (reported as [`VcpuEnd::Failed`]), or when the handle drops.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::KvmError;

/// How a vCPU thread ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The guest wrote to its done address.
    Done,
    /// The guest stopped in a way the thread cannot handle (a triple fault, an unexpected exit),
    /// or `KVM_RUN` failed.
    Failed(String),
    /// The handle was dropped.
    Stopped,
}

/// Whether the guest says it has finished (read from its memory), asked when it stops with a
/// shutdown (a triple fault): a guest may end that way once it has said so (one whose done
/// address is not mapped, say), and then it finished rather than crashed.
pub type FinishedCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Called on the vCPU thread when KVM reports the dirty ring full (the callee harvests and
/// resets the rings; the vCPU then runs again).
pub type RingFullHook = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
struct RunState {
    started: bool,
    parked: bool,
    stop: bool,
    end: Option<VcpuEnd>,
    /// When the thread first entered KVM_RUN after its start or last resume.
    running_since: Option<Instant>,
    /// When the thread last parked.
    parked_at: Option<Instant>,
    pauses: u32,
}

struct Shared {
    fd: Mutex<VcpuFd>,
    state: Mutex<RunState>,
    changed: Condvar,
    pause_requested: AtomicBool,
    thread: Mutex<Option<libc::pthread_t>>,
    done_addr: u64,
    ring_full: Mutex<Option<RingFullHook>>,
    finished: Mutex<Option<FinishedCheck>>,
    /// Percent of each throttle period the vCPU sleeps outside KVM_RUN (0: not throttled).
    throttle: AtomicU8,
    /// Set by the throttle timer with its kick: sleep now.
    throttle_sleep: AtomicBool,
    /// Nanoseconds slept for the throttle so far.
    throttled_ns: AtomicU64,
    /// Wakes the throttle timer when the throttle changes or the vCPU stops.
    throttle_changed: Condvar,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick(&self) {
        // Held while signalling: the thread clears the slot under this lock before it ends.
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *thread {
            // SAFETY: `t` is the id of a live thread (see above).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    fn finish(&self, end: VcpuEnd) {
        let mut st = self.state();
        st.end.get_or_insert(end);
        st.parked = false;
        self.changed.notify_all();
    }
}

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick signal's handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: set by this thread to its vCPU's kvm_run page, which outlives the thread's
        // run loop (the pointer is cleared before the thread lets go of the vCPU).
        unsafe { p.write_volatile(1) };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN: SIGRTMIN + 4.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

fn install_kick_handler() -> Result<(), KvmError> {
    static ONCE: Once = Once::new();
    static FAILED: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        // SAFETY: a plain sigaction with a handler that only writes one byte through a
        // thread-local pointer (async-signal-safe); SA_RESTART is off so the ioctl returns.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(1);
                FAILED.store(errno, Ordering::SeqCst);
            }
        }
    });
    match FAILED.load(Ordering::SeqCst) {
        0 => Ok(()),
        errno => Err(KvmError::new(format!(
            "cannot install the vCPU kick signal handler: {}",
            std::io::Error::from_raw_os_error(errno)
        ))),
    }
}

/// A vCPU and the thread that runs it.
pub struct VcpuThread {
    shared: Arc<Shared>,
    raw_fd: RawFd,
    join: Option<std::thread::JoinHandle<()>>,
    timer: Option<std::thread::JoinHandle<()>>,
}

/// The throttle's period: a throttled vCPU runs `100 - percent` % of it, then sleeps.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// The longest a pause waits for the vCPU thread to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuThread {
    /// Takes `fd` (its registers already set, or set later through [`VcpuThread::with_fd`]);
    /// nothing runs until [`VcpuThread::start`]. The guest signals its end with an MMIO write
    /// to `done_addr`.
    pub fn new(fd: VcpuFd, done_addr: u64) -> Self {
        VcpuThread {
            raw_fd: fd.as_raw_fd(),
            shared: Arc::new(Shared {
                fd: Mutex::new(fd),
                state: Mutex::new(RunState::default()),
                changed: Condvar::new(),
                pause_requested: AtomicBool::new(false),
                thread: Mutex::new(None),
                done_addr,
                ring_full: Mutex::new(None),
                finished: Mutex::new(None),
                throttle: AtomicU8::new(0),
                throttle_sleep: AtomicBool::new(false),
                throttled_ns: AtomicU64::new(0),
                throttle_changed: Condvar::new(),
            }),
            join: None,
            timer: None,
        }
    }

    /// Throttles the vCPU: it sleeps `percent` (at most 99) of every [`THROTTLE_PERIOD`]
    /// outside `KVM_RUN`; 0 lifts the throttle. The timer thread starts on first use.
    pub fn set_throttle(&mut self, percent: u8) -> Result<(), KvmError> {
        let percent = percent.min(99);
        {
            let _st = self.shared.state();
            self.shared.throttle.store(percent, Ordering::SeqCst);
            self.shared.throttle_changed.notify_all();
        }
        if percent > 0 && self.timer.is_none() {
            let shared = self.shared.clone();
            self.timer = Some(
                std::thread::Builder::new()
                    .name("memferry-throttle".into())
                    .spawn(move || throttle_timer(&shared))
                    .map_err(|e| KvmError::new(format!("cannot spawn the throttle timer: {e}")))?,
            );
        }
        Ok(())
    }

    /// The throttle in percent (0: none).
    pub fn throttle(&self) -> u8 {
        self.shared.throttle.load(Ordering::SeqCst)
    }

    /// Time the vCPU has slept for the throttle so far.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.shared.throttled_ns.load(Ordering::Relaxed))
    }

    /// The vCPU's file descriptor (valid while this handle lives), e.g. to map its dirty ring.
    pub fn raw_fd(&self) -> RawFd {
        self.raw_fd
    }

    /// Sets how the thread tells a finished guest's shutdown from a crash.
    pub fn set_finished_check(&self, check: FinishedCheck) {
        *self
            .shared
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(check);
    }

    /// Sets what the thread calls when the dirty ring is full.
    pub fn set_ring_full_hook(&self, hook: RingFullHook) {
        *self
            .shared
            .ring_full
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Starts the thread: the vCPU runs.
    pub fn start(&mut self) -> Result<(), KvmError> {
        install_kick_handler()?;
        {
            let mut st = self.shared.state();
            if st.started {
                return Err(KvmError::new("the vCPU was started already"));
            }
            st.started = true;
        }
        let shared = self.shared.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let join = std::thread::Builder::new()
            .name("memferry-vcpu".into())
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() };
                *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(me);
                let _ = tx.send(());
                run_loop(&shared);
            })
            .map_err(|e| KvmError::new(format!("cannot spawn the vCPU thread: {e}")))?;
        let _ = rx.recv();
        self.join = Some(join);
        Ok(())
    }

    /// Stops the vCPU and waits until its thread is parked outside KVM_RUN; returns how long
    /// that took. A vCPU not started or already ended is paused at once.
    pub fn pause(&self) -> Result<Duration, KvmError> {
        let t0 = Instant::now();
        let mut st = self.shared.state();
        if !st.started || st.end.is_some() {
            return Ok(t0.elapsed());
        }
        // Set even when parked: a thread resumed a moment ago may not have left its park yet,
        // and it stays there only if asked to.
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        if st.parked {
            return Ok(t0.elapsed());
        }
        self.shared.kick();
        let deadline = t0 + PAUSE_TIMEOUT;
        while !st.parked && st.end.is_none() {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                self.shared.pause_requested.store(false, Ordering::SeqCst);
                return Err(KvmError::new(format!(
                    "the vCPU thread did not stop within {PAUSE_TIMEOUT:?}"
                )));
            }
            // Kick again now and then: cheap insurance against a lost signal.
            let (guard, _) = self
                .shared
                .changed
                .wait_timeout(st, Duration::from_millis(5).min(deadline - now))
                .unwrap_or_else(|p| p.into_inner());
            st = guard;
            if !st.parked && st.end.is_none() {
                drop(st);
                self.shared.kick();
                st = self.shared.state();
            }
        }
        st.pauses += 1;
        Ok(t0.elapsed())
    }

    /// Asks the vCPU to stop and returns at once (the asynchronous half of
    /// [`VcpuThread::pause`]): signals the thread out of `KVM_RUN`, where it parks. True if the
    /// vCPU is stopped already (parked, not started or ended); otherwise poll
    /// [`VcpuThread::parked_at`], and [`VcpuThread::kick`] now and then against a lost
    /// signal. [`VcpuThread::resume`] cancels the request.
    pub fn request_pause(&self) -> bool {
        let st = self.shared.state();
        if !st.started || st.end.is_some() {
            return true;
        }
        // As in `pause`: set even when parked, so that a thread just resumed stays parked.
        self.shared.pause_requested.store(true, Ordering::SeqCst);
        if st.parked {
            return true;
        }
        drop(st);
        self.shared.kick();
        false
    }

    /// Whether the vCPU is stopped, without waiting for its thread (a thread that holds its
    /// state lock right now counts as not stopped yet): `Some(when it parked)` for a parked
    /// thread, `Some(now)` for a vCPU not started or ended, `None` while it runs.
    pub fn parked_at(&self) -> Option<Instant> {
        let st = match self.shared.state.try_lock() {
            Ok(st) => st,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        if !st.started || st.end.is_some() {
            Some(Instant::now())
        } else if st.parked {
            Some(st.parked_at.unwrap_or_else(Instant::now))
        } else {
            None
        }
    }

    /// Signals the thread out of `KVM_RUN` again if a pause is asked for and it has not parked:
    /// insurance against a lost signal while [`VcpuThread::request_pause`] is pending.
    pub fn kick(&self) {
        if self.shared.pause_requested.load(Ordering::SeqCst) && self.parked_at().is_none() {
            self.shared.kick();
        }
    }

    /// Lets a paused vCPU run again, or cancels a pause [`VcpuThread::request_pause`] asked
    /// for that the thread has not acted on yet (it runs on: the signal only makes its next
    /// `KVM_RUN` return at once).
    pub fn resume(&self) -> Result<(), KvmError> {
        let mut st = self.shared.state();
        self.shared.pause_requested.store(false, Ordering::SeqCst);
        st.running_since = None;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Runs `f` on the vCPU, which must not be running: not started, paused or ended.
    pub fn with_fd<R>(&self, f: impl FnOnce(&mut VcpuFd) -> R) -> Result<R, KvmError> {
        {
            let st = self.shared.state();
            if st.started && !st.parked && st.end.is_none() {
                return Err(KvmError::new(
                    "the vCPU is running: pause it before reading or writing its state",
                ));
            }
        }
        Ok(f(&mut self.shared.fd()))
    }

    /// How the thread ended, if it has.
    pub fn end(&self) -> Option<VcpuEnd> {
        self.shared.state().end.clone()
    }

    /// When the vCPU last entered KVM_RUN after its start or its last resume.
    pub fn running_since(&self) -> Option<Instant> {
        self.shared.state().running_since
    }

    /// Whether the thread is parked by a pause.
    pub fn is_paused(&self) -> bool {
        self.shared.state().parked
    }

    /// Waits until the thread ends or `timeout` passes; returns how it ended.
    pub fn wait_end(&self, timeout: Duration) -> Option<VcpuEnd> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state();
        while st.end.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        st.end.clone()
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state();
            st.stop = true;
            self.shared.pause_requested.store(true, Ordering::SeqCst);
            self.shared.changed.notify_all();
            self.shared.throttle_changed.notify_all();
        }
        self.shared.kick();
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

/// The throttle timer: while the throttle is on and the vCPU runs, lets it run its share of
/// each period, then asks it to sleep the rest (a flag and a kick out of KVM_RUN).
fn throttle_timer(shared: &Shared) {
    loop {
        let percent = {
            let mut st = shared.state();
            loop {
                if st.stop || st.end.is_some() {
                    return;
                }
                let p = shared.throttle.load(Ordering::SeqCst);
                if p > 0 {
                    break p;
                }
                st = shared
                    .throttle_changed
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        std::thread::sleep(THROTTLE_PERIOD * u32::from(100 - percent) / 100);
        if shared.throttle.load(Ordering::SeqCst) > 0 {
            shared.throttle_sleep.store(true, Ordering::SeqCst);
            shared.kick();
            // The vCPU sleeps its share now; the next period starts when it runs again.
            std::thread::sleep(THROTTLE_PERIOD * u32::from(percent) / 100);
        }
    }
}

/// Sleeps out the throttle's share of the period (outside KVM_RUN), in slices so that a pause
/// or a stop is not held up.
fn throttle_sleep(shared: &Shared) {
    if !shared.throttle_sleep.swap(false, Ordering::SeqCst) {
        return;
    }
    let percent = shared.throttle.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let until = t0 + THROTTLE_PERIOD * u32::from(percent) / 100;
    while !shared.pause_requested.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            break;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(1)));
    }
    shared
        .throttled_ns
        .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
}

/// Parks the thread until resumed; false if it must stop instead.
fn park(shared: &Shared) -> bool {
    let mut st = shared.state();
    st.parked = true;
    st.parked_at = Some(Instant::now());
    shared.changed.notify_all();
    while shared.pause_requested.load(Ordering::SeqCst) && !st.stop {
        st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
    }
    st.parked = false;
    !st.stop
}

fn run_loop(shared: &Shared) {
    let mut fd = shared.fd();
    let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
    let mut noted_running = false;
    let end = loop {
        if shared.pause_requested.load(Ordering::SeqCst) {
            drop(fd);
            let go_on = park(shared);
            fd = shared.fd();
            fd.set_kvm_immediate_exit(0);
            noted_running = false;
            if !go_on {
                break VcpuEnd::Stopped;
            }
            continue;
        }
        if !noted_running {
            noted_running = true;
            let mut st = shared.state();
            st.running_since.get_or_insert_with(Instant::now);
        }
        let outcome = match fd.run() {
            Ok(VcpuExit::MmioWrite(addr, _)) if addr == shared.done_addr => Some(VcpuEnd::Done),
            Ok(VcpuExit::Unsupported(reason)) if reason == KVM_EXIT_DIRTY_RING_FULL => {
                let hook = shared
                    .ring_full
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                match hook {
                    Some(hook) => {
                        hook();
                        None
                    }
                    None => Some(VcpuEnd::Failed(
                        "the dirty ring is full and nothing harvests it".into(),
                    )),
                }
            }
            Ok(VcpuExit::Intr) => None,
            // A kernel at CPL0 that halts (interrupts off: nothing wakes it) has ended.
            Ok(VcpuExit::Hlt) => Some(VcpuEnd::Done),
            Ok(VcpuExit::Shutdown) => {
                let check = shared
                    .finished
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                Some(match check {
                    Some(check) if check() => VcpuEnd::Done,
                    _ => VcpuEnd::Failed(
                        "the guest shut down (a triple fault) before it had finished".into(),
                    ),
                })
            }
            Ok(exit) => Some(VcpuEnd::Failed(format!(
                "the guest stopped with an exit the VMM does not handle: {exit:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VcpuEnd::Failed(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(end) = outcome {
            break end;
        }
        if shared.throttle_sleep.load(Ordering::SeqCst) {
            fd.set_kvm_immediate_exit(0);
            drop(fd);
            throttle_sleep(shared);
            fd = shared.fd();
        }
    };
    IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = None;
    drop(fd);
    shared.finish(end);
}
