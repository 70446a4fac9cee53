//! Why opening a pool failed, as stable names a caller can match on (the NIF turns
//! them into atoms), with the full text kept for logs.

use std::fmt;
use std::io;

use crate::handshake::HandshakeError;

/// Why `Runtime::open_pool` failed. Cloned to every caller waiting on the same dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// The TCP connect failed (refused, unreachable, timed out).
    Connect { reason: &'static str, message: String },
    /// The cookie handshake failed.
    Handshake { reason: &'static str, message: String },
    /// The peer speaks no protocol version this node does (its version, ours).
    Version { peer: u8, local: u8 },
    /// A socket call after the handshake failed (writing the pool's first frame).
    Io { reason: &'static str, message: String },
    /// The runtime is stopping.
    Stopping,
    /// The new pool closed before it was up (a connection lost, or one of its threads
    /// panicked or could not start): why, in words.
    Closed(String),
    /// The dial's own thread panicked or could not start: why, in words.
    Internal(String),
}

/// What follows the class in a reason: a stable name, a text for logs, or nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Detail<'a> {
    None,
    Name(&'static str),
    Text(&'a str),
    /// `{version, Peer, Local}`: the two protocol versions.
    Versions(u8, u8),
}

impl OpenError {
    pub fn connect(e: &io::Error) -> OpenError {
        OpenError::Connect {
            reason: io_reason(e),
            message: e.to_string(),
        }
    }

    pub fn handshake(e: &HandshakeError) -> OpenError {
        if let HandshakeError::Version { peer, local } = *e {
            return OpenError::Version { peer, local };
        }
        let reason = match e {
            // Named after the i/o error: a peer closing on us (over its pending-handshake
            // cap, or refusing our hello) is `closed`.
            HandshakeError::Io(io) => io_reason(io),
            other => other.reason(),
        };
        OpenError::Handshake {
            reason,
            message: e.to_string(),
        }
    }

    pub fn io(e: &io::Error) -> OpenError {
        OpenError::Io {
            reason: io_reason(e),
            message: e.to_string(),
        }
    }

    /// The stable name of the failure's class: `connect`, `handshake`, `io`, `stopping`,
    /// `closed` or `internal`.
    pub fn class(&self) -> &'static str {
        match self {
            OpenError::Connect { .. } => "connect",
            OpenError::Handshake { .. } | OpenError::Version { .. } => "handshake",
            OpenError::Io { .. } => "io",
            OpenError::Stopping => "stopping",
            OpenError::Closed(_) => "closed",
            OpenError::Internal(_) => "internal",
        }
    }

    /// Within the class: the cause's stable name (`econnrefused`, `timeout`,
    /// `bad_cookie`, ...), or a text where there is no fixed set of causes.
    pub fn detail(&self) -> Detail<'_> {
        match self {
            OpenError::Connect { reason, .. }
            | OpenError::Handshake { reason, .. }
            | OpenError::Io { reason, .. } => Detail::Name(reason),
            OpenError::Version { peer, local } => Detail::Versions(*peer, *local),
            OpenError::Stopping => Detail::None,
            OpenError::Closed(why) | OpenError::Internal(why) => Detail::Text(why),
        }
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Connect { message, .. } => write!(f, "connect failed: {message}"),
            OpenError::Handshake { message, .. } => write!(f, "handshake failed: {message}"),
            OpenError::Version { peer, local } => write!(
                f,
                "handshake failed: {}",
                HandshakeError::Version {
                    peer: *peer,
                    local: *local
                }
            ),
            OpenError::Io { message, .. } => write!(f, "socket error: {message}"),
            OpenError::Stopping => f.write_str("stopping"),
            OpenError::Closed(why) => write!(f, "pool closed as it opened: {why}"),
            OpenError::Internal(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for OpenError {}

/// Why a connection or a pool closed, as names a caller can match on (the NIF turns
/// them into `closed`, `{io, econnreset}`, `{bad_frame, frame_too_large}`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed on request (`close_pool`).
    Closed,
    /// The runtime is stopping.
    Stopping,
    /// The peer closed the connection.
    PeerClosed,
    /// The peer wrote on one of our outbound connections, which only we write on.
    UnexpectedData,
    /// A newer pool from the same node replaced this inbound connection's.
    Superseded,
    /// A socket call failed: the errno's name.
    Io(&'static str),
    /// A frame header we refuse (`frame_too_large`, `empty_frame`, `unknown_frame_kind`,
    /// `pool_epoch`: a pool announcement out of place).
    BadFrame(&'static str),
    /// A frame body the handler could not decode: why, in words.
    Malformed(String),
    /// A thread of ours panicked while serving the connection: why, in words.
    Internal(String),
}

impl CloseReason {
    pub fn io(e: &io::Error) -> CloseReason {
        CloseReason::Io(io_reason(e))
    }

    /// The stable name of the reason's class (`closed`, `io`, `bad_frame`, ...).
    pub fn class(&self) -> &'static str {
        match self {
            CloseReason::Closed => "closed",
            CloseReason::Stopping => "stopping",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::UnexpectedData => "unexpected_data",
            CloseReason::Superseded => "superseded",
            CloseReason::Io(_) => "io",
            CloseReason::BadFrame(_) => "bad_frame",
            CloseReason::Malformed(_) => "malformed",
            CloseReason::Internal(_) => "internal",
        }
    }

    pub fn detail(&self) -> Detail<'_> {
        match self {
            CloseReason::Io(name) | CloseReason::BadFrame(name) => Detail::Name(name),
            CloseReason::Malformed(why) | CloseReason::Internal(why) => Detail::Text(why),
            _ => Detail::None,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.detail() {
            Detail::None => f.write_str(self.class()),
            Detail::Name(name) => write!(f, "{}: {name}", self.class()),
            Detail::Text(text) => write!(f, "{}: {text}", self.class()),
            Detail::Versions(peer, local) => write!(f, "{}: protocol {peer} against {local}", self.class()),
        }
    }
}

/// Why something a thread owned ended without saying: it panicked (its guard drops
/// while unwinding) or it was dropped unserved (its thread stopped first).
pub(crate) fn ended_early(thread: &str) -> String {
    if std::thread::panicking() {
        format!("the {thread} thread panicked")
    } else {
        format!("the {thread} thread let go of it")
    }
}

/// An i/o failure we name ourselves (a TLS failure: `tls_unknown_ca`, ...), with the
/// words of whoever found it, for logs.
#[derive(Debug)]
pub(crate) struct NamedFailure {
    pub reason: &'static str,
    pub message: String,
}

impl fmt::Display for NamedFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NamedFailure {}

/// An i/o error that `io_reason` names `reason`.
// Only TLS names its failures, and TLS is built on Linux and FreeBSD only.
#[cfg_attr(not(any(target_os = "linux", target_os = "freebsd")), allow(dead_code))]
pub(crate) fn named_failure(reason: &'static str, message: String) -> io::Error {
    io::Error::other(NamedFailure { reason, message })
}

/// A stable name for an i/o error, as Erlang's inet names them (`econnrefused`,
/// `emfile`, ...); `timeout` for a timeout, `closed` for an end of stream; a
/// `named_failure`'s own name.
pub fn io_reason(e: &io::Error) -> &'static str {
    if let Some(named) = e.get_ref().and_then(|inner| inner.downcast_ref::<NamedFailure>()) {
        return named.reason;
    }
    if let Some(name) = e.raw_os_error().and_then(errno_name) {
        return name;
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timeout",
        io::ErrorKind::UnexpectedEof => "closed",
        io::ErrorKind::ConnectionRefused => "econnrefused",
        io::ErrorKind::ConnectionReset => "econnreset",
        io::ErrorKind::ConnectionAborted => "econnaborted",
        io::ErrorKind::BrokenPipe => "epipe",
        io::ErrorKind::AddrNotAvailable => "eaddrnotavail",
        io::ErrorKind::PermissionDenied => "eacces",
        io::ErrorKind::OutOfMemory => "enomem",
        _ => "unknown",
    }
}

fn errno_name(errno: i32) -> Option<&'static str> {
    Some(match errno {
        libc::ECONNREFUSED => "econnrefused",
        libc::ETIMEDOUT => "timeout",
        libc::EHOSTUNREACH => "ehostunreach",
        libc::ENETUNREACH => "enetunreach",
        libc::ENETDOWN => "enetdown",
        libc::ECONNRESET => "econnreset",
        libc::ECONNABORTED => "econnaborted",
        libc::EPIPE => "epipe",
        libc::EADDRNOTAVAIL => "eaddrnotavail",
        libc::EADDRINUSE => "eaddrinuse",
        libc::EACCES => "eacces",
        libc::EPERM => "eperm",
        libc::EMFILE => "emfile",
        libc::ENFILE => "enfile",
        libc::ENOBUFS => "enobufs",
        libc::ENOMEM => "enomem",
        libc::EINVAL => "einval",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_have_stable_names() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            OpenError::connect(&refused).detail(),
            Detail::Name("econnrefused")
        );
        let timed_out = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(OpenError::connect(&timed_out).detail(), Detail::Name("timeout"));
        let cookie = OpenError::handshake(&HandshakeError::BadCookie);
        assert_eq!(
            (cookie.class(), cookie.detail()),
            ("handshake", Detail::Name("bad_cookie"))
        );
        let eof = HandshakeError::Io(io::ErrorKind::UnexpectedEof.into());
        assert_eq!(OpenError::handshake(&eof).detail(), Detail::Name("closed"));
        assert_eq!(OpenError::Stopping.detail(), Detail::None);
        assert_eq!(io_reason(&io::Error::from_raw_os_error(libc::EMFILE)), "emfile");
        assert_eq!(io_reason(&io::Error::other("odd")), "unknown");
    }
}
