//! The scheduling priority of the threads that move frames over the sockets, and of
//! the handshake thread (a few nice levels below them).
//!
//! A bulk transfer keeps its I/O threads running as long as there are
//! bytes to copy. Where the VM's schedulers share the cores with them, a woken
//! scheduler waits for one of those threads to leave the core, so the node's other
//! work (disterl traffic, gen_server calls, timers) waits behind the bulk. At `Idle`,
//! the kernel runs these threads only on cores nothing else wants, and takes the core
//! back from them as soon as a normal thread wakes (at their next system call on a
//! kernel that does not preempt inside one).

/// `Config::io_thread_priority`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoThreadPriority {
    /// Like every other thread of the VM.
    #[default]
    Normal,
    /// Linux `SCHED_IDLE`: only CPU time the rest of the machine leaves unused. A node
    /// whose schedulers keep every core busy starves its teleport traffic (senders then
    /// wait on the send queue limit). Senders never block on a lock these threads hold
    /// (the direct write only `try_lock`s), but a reader delivering a message takes the
    /// receiving process's locks inside `enif_send`: preempted there, it holds up a
    /// scheduler that needs the same lock until a core goes idle and the kernel runs it.
    /// Not seen in the benchmarks; one more reason this is not the default.
    Idle,
}

/// Applies `priority` to the calling thread. One way: an unprivileged thread may lower
/// its priority but not raise it again, so threads that need it are started at it.
pub fn apply_to_current_thread(priority: IoThreadPriority) -> std::io::Result<()> {
    match priority {
        IoThreadPriority::Normal => Ok(()),
        IoThreadPriority::Idle => set_idle(),
    }
}

/// Lowers the calling thread's priority by `steps` nice levels (the handshake
/// thread's, see `engine`). Linux only, where the nice value is the thread's;
/// elsewhere it is the process's, so nothing is done.
#[cfg(target_os = "linux")]
pub fn lower_current_thread(steps: i32) -> std::io::Result<()> {
    // SAFETY: plain system calls on the calling thread (who = 0). -1 is also a valid
    // priority: errno tells.
    unsafe {
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        if current == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, (current + steps).min(19)) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn lower_current_thread(_steps: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(target_os = "linux")]
fn set_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call on the calling thread (pid 0) with a valid parameter.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_idle() -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// The calling thread's policy is `SCHED_IDLE`.
#[cfg(all(test, target_os = "linux"))]
fn current_thread_is_idle() -> bool {
    // SAFETY: plain system call on the calling thread.
    unsafe { libc::sched_getscheduler(0) == libc::SCHED_IDLE }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn lowering_lowers_only_the_calling_thread() {
        // SAFETY: plain system call on the calling thread.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let before = nice();
        std::thread::spawn(move || {
            assert_eq!(nice(), before);
            lower_current_thread(3).unwrap();
            assert_eq!(nice(), (before + 3).min(19));
        })
        .join()
        .unwrap();
        assert_eq!(nice(), before);
    }

    #[test]
    fn idle_lowers_only_the_calling_thread() {
        std::thread::spawn(|| {
            assert!(!current_thread_is_idle());
            apply_to_current_thread(IoThreadPriority::Normal).unwrap();
            assert!(!current_thread_is_idle());
            apply_to_current_thread(IoThreadPriority::Idle).unwrap();
            assert!(current_thread_is_idle());
        })
        .join()
        .unwrap();
        assert!(!current_thread_is_idle());
    }
}
