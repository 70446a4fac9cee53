//! The system calls teleport makes on its TCP sockets: the listening socket, the
//! options every connection gets (no Nagle, keepalive), sends that never raise SIGPIPE,
//! peeking at and dropping what the kernel holds, delayed ACKs, the send buffer and its
//! bound on bytes not yet sent, and the round trip and delivery rate TCP measured.
//! (Connecting, reading and polling are mio's.)

use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// Every connection, once connected: small frames (calls, acks) must not wait for
/// Nagle, and a peer that vanished without a FIN or RST (a partition, a power cut) would
/// keep a connection open forever: TCP keepalive finds it in about a minute.
pub(crate) fn set_connection_options(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let probe = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&probe);
}

pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted node can take its fixed port back while old sockets sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Our sockets are written with MSG_NOSIGNAL: a peer's reset must be an error, not a
/// SIGPIPE (the VM ignores it, a test binary might not).
#[cfg(any(target_os = "linux", target_os = "freebsd"))]
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
/// macOS has no MSG_NOSIGNAL (std sets SO_NOSIGPIPE on its sockets; the VM ignores
/// SIGPIPE).
#[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
const SEND_FLAGS: libc::c_int = libc::MSG_DONTWAIT;

/// Linux's and the BSDs' IOV_MAX.
const MAX_SLICES: usize = 1024;

/// The socket as a `Write` whose writes are `send`s with `SEND_FLAGS`.
pub(crate) struct SendNoSignal<'a>(pub &'a TcpStream);

impl Write for SendNoSignal<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(self.0).send_with_flags(buf, SEND_FLAGS)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // sendmsg refuses more slices than IOV_MAX (EMSGSIZE), where writev would take
        // the first ones: a frame of many referenced binaries has more.
        let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
        socket2::SockRef::from(self.0).send_vectored_with_flags(bufs, SEND_FLAGS)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `peek` and `discard` work: dropping bytes without copying them (MSG_TRUNC)
/// is Linux's; elsewhere TCP may ignore the flag.
pub(crate) const CAN_PEEK: bool = cfg!(target_os = "linux");

/// Copies what the socket holds into `buf` and leaves it there.
#[cfg(target_os = "linux")]
pub(crate) fn peek(socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: initialised bytes are valid `MaybeUninit<u8>`s, and `recv` writes nothing
    // but bytes into them.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    socket2::SockRef::from(socket).recv_with_flags(uninit, libc::MSG_PEEK)
}

/// Without `CAN_PEEK` nothing peeks; a plain peek, should anything ask.
#[cfg(not(target_os = "linux"))]
pub(crate) fn peek(socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    socket.peek(buf)
}

/// Drops the next `n` bytes the socket holds (already peeked), without copying them.
#[cfg(target_os = "linux")]
pub(crate) fn discard(socket: &TcpStream, mut n: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // With MSG_TRUNC the kernel copies nothing; the buffer only gives the length.
    let mut none = [0u8; 0];
    while n > 0 {
        let len = n.min(isize::MAX as usize);
        // SAFETY: with MSG_TRUNC, recv writes nothing into the (empty) buffer and
        // returns how many bytes it dropped, up to `len`.
        let dropped = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                none.as_mut_ptr().cast(),
                len,
                libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            )
        };
        if dropped < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if dropped == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        n -= dropped as usize;
    }
    Ok(())
}

/// Without `CAN_PEEK` nothing was peeked, so there is nothing to drop.
#[cfg(not(target_os = "linux"))]
pub(crate) fn discard(_socket: &TcpStream, _n: usize) -> io::Result<()> {
    Ok(())
}

/// Puts the socket in delayed-ACK mode for the bytes the next read finds (Linux; the
/// kernel leaves it after every ACK it sends at once).
pub(crate) fn delay_acks(socket: &TcpStream) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(socket).set_quickack(false);
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Sets `SO_SNDBUF` (best effort: a refused size leaves the kernel's own).
pub(crate) fn set_send_buffer(socket: &TcpStream, bytes: usize) {
    let _ = socket2::SockRef::from(socket).set_send_buffer_size(bytes);
}

/// The send buffer as the kernel reports it.
pub(crate) fn send_buffer(socket: &TcpStream) -> Option<usize> {
    socket2::SockRef::from(socket).send_buffer_size().ok()
}

/// Sets `TCP_NOTSENT_LOWAT` (Linux; best effort: without it, only the send buffer bounds
/// what the kernel holds not yet sent).
pub(crate) fn set_not_sent_bound(socket: &TcpStream, bytes: u32) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value = bytes as libc::c_int;
        // SAFETY: a valid socket descriptor, and an int option of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NOTSENT_LOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (socket, bytes);
}

/// The socket's own `TCP_NOTSENT_LOWAT` (0: the system's default).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn not_sent_bound(socket: &TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int option into an int of the size given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    value as u32
}

/// The connection's `TCP_INFO` (Linux) and how many bytes of it the kernel filled.
#[cfg(target_os = "linux")]
fn tcp_info(socket: &TcpStream) -> Option<(libc::tcp_info, usize)> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; getsockopt writes at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above, into `info`, `len` bytes at most.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some((info, len as usize))
}

/// The connection's round trip as TCP measured it (Linux `TCP_INFO`): the minimum seen,
/// which is the path's and not a moment's queueing or a delayed ACK; the smoothed one on a
/// kernel older than 4.6, which does not report the minimum. Elsewhere, none.
pub(crate) fn round_trip(socket: &TcpStream) -> Option<Duration> {
    #[cfg(target_os = "linux")]
    {
        let (info, len) = tcp_info(socket)?;
        let has_min = len >= std::mem::offset_of!(libc::tcp_info, tcpi_min_rtt) + 4;
        let micros = if has_min && info.tcpi_min_rtt != 0 {
            info.tcpi_min_rtt
        } else {
            info.tcpi_rtt
        };
        Some(Duration::from_micros(u64::from(micros)))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}

/// The rate, in bytes a second, at which the connection's last data was delivered as
/// TCP measured it (Linux 4.9 and later `TCP_INFO`); none elsewhere or before any.
pub(crate) fn delivery_rate(socket: &TcpStream) -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let (info, len) = tcp_info(socket)?;
        let has_rate = len >= std::mem::offset_of!(libc::tcp_info, tcpi_delivery_rate) + 8;
        (has_rate && info.tcpi_delivery_rate != 0).then_some(info.tcpi_delivery_rate)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        None
    }
}
