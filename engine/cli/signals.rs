//! SIGINT (Ctrl-C), SIGTERM and SIGHUP during `pipe run`.
//!
//! The first signal sets the run's cancel flag: no new node starts, running stages see
//! `is_cancelled()` (a `shell` stage's command group gets SIGTERM, then SIGKILL 2 s later), a
//! node waiting for a key lock stops waiting, each interrupted node's staging folder is deleted
//! and its key lock released, finished nodes stay committed, and `pipe` exits with 128 + the
//! signal's number, as a shell reports a process the signal killed: 130 (SIGINT), 143 (SIGTERM),
//! 129 (SIGHUP). A second signal exits at once with the same code, without waiting for stages:
//! key locks are released by the kernel, and staging folders are left to the next run of their
//! key (or `pipe gc`).
//!
//! A signal that was ignored when `pipe` started stays ignored, as POSIX shells leave it:
//! `nohup pipe run ... &` keeps running when the terminal hangs up (SIGHUP), and a script's
//! `pipe run ... &` is not stopped by a Ctrl-C meant for the script (SIGINT).
//!
//! The handler does only what is async-signal-safe: atomic stores, `write(2)` and `_exit(2)`.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// The run's cancel flag, set by the first signal.
static CANCEL: AtomicBool = AtomicBool::new(false);
/// The first signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Whether `sig` is ignored (`SIG_IGN`) in this process.
fn ignored(sig: libc::c_int) -> bool {
    // SAFETY: queries the current action into a zero-initialised struct (no new action).
    #[allow(unsafe_code)]
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP, except for those ignored at start;
/// returns the cancel flag it sets.
pub fn install() -> &'static AtomicBool {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if ignored(sig) {
            continue;
        }
        let handler: extern "C" fn(libc::c_int) = on_signal;
        // SAFETY: `sigaction` is given a zero-initialised (valid) struct whose handler is a
        // plain `extern "C"` function that only makes async-signal-safe calls; the old action
        // is not requested (null).
        #[allow(unsafe_code)]
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            tracing::warn!(
                "cannot install the handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    &CANCEL
}

/// 128 + the number of the first signal received (130 when none was: a cancel from elsewhere).
pub fn exit_code() -> u8 {
    let sig = match SIGNAL.load(Ordering::SeqCst) {
        0 => libc::SIGINT,
        s => s,
    };
    u8::try_from(128 + sig).unwrap_or(130)
}

extern "C" fn on_signal(sig: libc::c_int) {
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    if CANCEL.swap(true, Ordering::SeqCst) {
        write_stderr(b"\npipe: signalled again, exiting now (finished nodes are kept)\n");
        // SAFETY: `_exit` is async-signal-safe and never returns.
        #[allow(unsafe_code)]
        unsafe {
            libc::_exit(128 + SIGNAL.load(Ordering::SeqCst));
        }
    }
    let msg: &[u8] = if sig == libc::SIGINT {
        b"\npipe: interrupting: stopping running nodes (Ctrl-C again to exit at once)\n"
    } else {
        b"\npipe: terminating: stopping running nodes (signal again to exit at once)\n"
    };
    write_stderr(msg);
}

/// `write(2)` to stderr, ignoring errors (async-signal-safe).
fn write_stderr(msg: &[u8]) {
    // SAFETY: `write` is async-signal-safe; the pointer and length describe a live slice.
    #[allow(unsafe_code)]
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
    }
}

/// Restores the default SIGPIPE action (Rust ignores it), so `pipe plan FILE | head` ends
/// quietly as other Unix tools do, instead of panicking on "failed printing to stdout". Called
/// once at the start of `main`; `pipe run` writes its results into the store, never only to a
/// pipe, so dying of SIGPIPE loses nothing that the store does not keep.
pub fn default_sigpipe() {
    // SAFETY: setting a standard disposition for SIGPIPE before any thread is spawned.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
