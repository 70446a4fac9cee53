//! The listening socket and its accept loop. Each accepted socket gets its own
//! thread, bounded by the number of handshakes allowed in flight.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

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

/// Runs until `Shared::stop` shuts the listener down.
pub(crate) fn run_acceptor(shared: &Arc<Shared>, listener: TcpListener) {
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
        // Bound the threads an unauthenticated crowd can make us hold.
        if shared.pending_handshakes.fetch_add(1, SeqCst) >= shared.config.max_pending_handshakes {
            shared.pending_handshakes.fetch_sub(1, SeqCst);
            drop(stream);
            continue;
        }
        let conn_shared = shared.clone();
        shared.spawn(format!("teleport-in-{remote}"), move || {
            run_inbound(&conn_shared, stream, remote)
        });
    }
}
