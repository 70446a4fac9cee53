//! The listening socket and its accept loop. Each accepted socket gets its own
//! thread, bounded by the number of handshakes allowed in flight, overall and per source.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::faults::{self, Point};
use crate::inbound::run_inbound;
use crate::runtime::Shared;

/// A peer that vanished without a FIN or RST (a partition, a power cut) would keep a
/// reader blocked forever: TCP keepalive finds it in about a minute.
pub(crate) fn keep_alive(stream: &TcpStream) {
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
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// After a panic, the acceptor waits this long before it accepts again: a bug that
/// panics on every connection makes a few reports a second, not a busy loop.
const RESTART_PAUSE: Duration = Duration::from_millis(100);

/// The acceptor thread's body: accepts until `Shared::stop` shuts the listener down.
/// A panic (a bug) is reported and accepting resumes: the listening socket is still
/// fine, and a dead acceptor would leave the node bound but deaf, its peers' dials
/// timing out in the handshake with nothing on this side to say why.
pub(crate) fn keep_accepting(shared: &Arc<Shared>, listener: &TcpListener, thread: &str) {
    while let Err(panic) = catch_unwind(AssertUnwindSafe(|| run_acceptor(shared, listener))) {
        shared.report_panic(thread, &*panic);
        if shared.is_stopping() {
            return;
        }
        std::thread::sleep(RESTART_PAUSE);
    }
}

fn run_acceptor(shared: &Arc<Shared>, listener: &TcpListener) {
    loop {
        let (stream, remote) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(_) if shared.is_stopping() => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or memory: accepting harder will not help.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.is_stopping() {
            return;
        }
        faults::check(Point::Acceptor, &shared.config.local_node);
        // Bound the threads an unauthenticated crowd can make us hold, and the share of
        // them one source can take, so a few silent hosts cannot lock real peers out.
        let Some(slot) = HandshakeSlot::take(shared, remote.ip()) else {
            shared.handshake_failures_in.fetch_add(1, SeqCst);
            drop(stream);
            continue;
        };
        let conn_shared = shared.clone();
        // If the thread cannot start, dropping the body closes the socket and frees the slot.
        let _ = shared.spawn(format!("teleport-in-{remote}"), move || {
            run_inbound(&conn_shared, stream, remote, slot)
        });
    }
}

/// One handshake in progress at the listener, counted against `max_pending_handshakes`
/// and against its source's `max_pending_handshakes_per_ip`; given back on drop.
pub(crate) struct HandshakeSlot {
    shared: Arc<Shared>,
    source: IpAddr,
}

impl HandshakeSlot {
    /// `None` when the listener or this source already has its share in progress.
    fn take(shared: &Arc<Shared>, ip: IpAddr) -> Option<HandshakeSlot> {
        let source = source_of(ip);
        let mut by_source = shared.pending_by_source.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = by_source.get(&source).copied().unwrap_or(0);
        if shared.pending_handshakes.load(SeqCst) >= shared.config.max_pending_handshakes
            || from_source >= shared.config.max_pending_handshakes_per_ip
        {
            return None;
        }
        by_source.insert(source, from_source + 1);
        shared.pending_handshakes.fetch_add(1, SeqCst);
        Some(HandshakeSlot {
            shared: shared.clone(),
            source,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut by_source = self
            .shared
            .pending_by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
        self.shared.pending_handshakes.fetch_sub(1, SeqCst);
    }
}

/// Who a connection comes from, for the per-source cap: the IPv4 address (also when
/// it reaches a dual-stack listener as `::ffff:a.b.c.d`), or the IPv6 /64, which a
/// single host usually has whole.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::source_of;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address literal")
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_prefixes() {
        assert_eq!(source_of(ip("127.0.0.2")), ip("127.0.0.2"));
        assert_eq!(source_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2::ffff")),
            source_of(ip("2001:db8:1:2:1::"))
        );
        assert_ne!(source_of(ip("2001:db8:1:2::1")), source_of(ip("2001:db8:1:3::1")));
        assert_eq!(source_of(ip("::1")), ip("::"));
    }
}
