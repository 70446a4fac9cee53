//! TLS 1.3 between real runtimes over loopback, with certificates made here (rcgen):
//! pools carry frames in order both ways; a wrong CA, an expired certificate, no client
//! certificate, a plain-text client, a TLS client at a plain-text listener and a host
//! name mismatch are refused and counted. Every wait is bounded.
#![cfg(any(target_os = "linux", target_os = "freebsd"))]

use std::any::Any;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use teleport_net::handshake::{client_handshake, HandshakeConfig};
use teleport_net::{
    BodyBuffer, Config, Deferral, Delivery, Detail, Event, FrameHandler, FrameKind, Host, OpenError,
    OpenStatus, OutFrame, Runtime, TlsConfig,
};

const COOKIE: &[u8] = b"tls-cookie";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Certificates

static DIR_SEQ: AtomicU64 = AtomicU64::new(0);

/// A directory of PEM files, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let n = DIR_SEQ.fetch_add(1, SeqCst);
        let dir = std::env::temp_dir().join(format!("teleport-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Dir(dir)
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, pem).expect("write pem");
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed CA");
    Ca {
        issuer: Issuer::new(params, key),
        pem: cert.pem(),
    }
}

/// How a node's certificate is made.
struct Leaf<'a> {
    names: &'a [&'a str],
    expired: bool,
}

const LOOPBACK: Leaf<'static> = Leaf {
    names: &["127.0.0.1", "localhost"],
    expired: false,
};

/// Writes a node's certificate (signed by `by`), its key and `trusts` as its CA file.
fn node_tls(dir: &Dir, node: &str, by: &Ca, leaf: Leaf<'_>, trusts: &[&Ca]) -> TlsConfig {
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = leaf.names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name.push(DnType::CommonName, node);
    if leaf.expired {
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
    }
    let cert = params.signed_by(&key, &by.issuer).expect("signed");
    let tag = node.replace(['@', '.'], "_");
    let cas: String = trusts.iter().map(|ca| ca.pem.clone()).collect();
    TlsConfig::new(
        dir.write(&format!("{tag}.crt"), &cert.pem()),
        dir.write(&format!("{tag}.key"), &key.serialize_pem()),
        dir.write(&format!("{tag}-ca.crt"), &cas),
    )
}

// ---------------------------------------------------------------------------
// The test host: frames and events, with its own buffers for large bodies.

#[derive(Default)]
struct Log {
    frames: Vec<(String, Vec<u8>)>,
    events: Vec<Event>,
    /// Bodies that were read into a buffer of the handler's own.
    owned: usize,
    /// Frames whose body was `defer`, deferred by their handler.
    deferred: Vec<teleport_net::Resume>,
}

#[derive(Clone, Default)]
struct TestHost(Arc<(Mutex<Log>, Condvar)>, Arc<AtomicU64>);

impl TestHost {
    fn record(&self, update: impl FnOnce(&mut Log)) {
        update(&mut self.0 .0.lock().unwrap());
        self.0 .1.notify_all();
    }

    fn wait_for(&self, done: impl Fn(&Log) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut log = self.0 .0.lock().unwrap();
        while !done(&log) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            log = self.0 .1.wait_timeout(log, left).unwrap().0;
        }
        true
    }

    /// Waits for the listener's event for a refusal for `reason`.
    fn wait_refused(&self, reason: &str) -> bool {
        self.wait_for(|log| {
            log.events
                .iter()
                .any(|e| matches!(e, Event::HandshakeFailed { reason: r, .. } if *r == reason))
        })
    }

    fn events(&self) -> String {
        format!("{:#?}", self.0 .0.lock().unwrap().events)
    }
}

impl Host for TestHost {
    fn frame_handler(&self, peer: &str) -> Box<dyn FrameHandler> {
        Box::new(Handler {
            host: self.clone(),
            peer: peer.to_string(),
        })
    }

    fn event(&self, event: Event) {
        self.record(|log| log.events.push(event));
    }
}

struct Handler {
    host: TestHost,
    peer: String,
}

struct Owned(Vec<u8>);

impl BodyBuffer for Owned {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

impl FrameHandler for Handler {
    fn handle(&mut self, _kind: FrameKind, body: &[u8], deferral: &Deferral) -> Result<Delivery, String> {
        // A slow handler (back-pressure tests): milliseconds per frame.
        let delay = self.host.1.load(SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let frame = (self.peer.clone(), body.to_vec());
        if body == b"defer" {
            let resume = deferral.defer();
            self.host.record(|log| {
                log.frames.push(frame);
                log.deferred.push(resume);
            });
            return Ok(Delivery::Deferred);
        }
        self.host.record(|log| log.frames.push(frame));
        Ok(Delivery::Delivered)
    }

    fn body_buffer(&mut self, len: usize) -> Result<Option<Box<dyn BodyBuffer>>, String> {
        Ok(Some(Box::new(Owned(vec![0; len]))))
    }

    fn handle_owned(
        &mut self,
        _kind: FrameKind,
        body: Box<dyn BodyBuffer>,
        _deferral: &Deferral,
    ) -> Result<Delivery, String> {
        let body = body.into_any().downcast::<Owned>().map_err(|_| "not ours")?.0;
        let frame = (self.peer.clone(), body);
        self.host.record(|log| {
            log.frames.push(frame);
            log.owned += 1;
        });
        Ok(Delivery::Delivered)
    }
}

// ---------------------------------------------------------------------------
// Nodes

struct Node {
    rt: Runtime,
    host: TestHost,
}

impl Node {
    fn start(name: &str, tls: Option<TlsConfig>) -> Node {
        let mut config = Config::for_tests(name, COOKIE);
        config.tls = tls;
        let host = TestHost::default();
        let rt = Runtime::start(config, Arc::new(host.clone())).expect("runtime starts");
        Node { rt, host }
    }

    fn addr(&self) -> SocketAddr {
        self.rt.local_addr()
    }

    fn name(&self) -> &str {
        &self.rt.config().local_node
    }

    fn open(&self, peer: &Node, size: usize) -> Result<(), OpenError> {
        let (tx, rx) = mpsc::channel();
        match self.rt.open_pool(
            peer.name(),
            peer.addr(),
            size,
            Box::new(move |r| drop(tx.send(r))),
        ) {
            OpenStatus::AlreadyUp => Ok(()),
            OpenStatus::Opening => rx.recv_timeout(WAIT).expect("open_pool callback runs"),
        }
    }

    fn send(&self, peer: &str, key: u64, body: Vec<u8>) {
        let frame = OutFrame::new(FrameKind::Send, Box::new(body)).expect("fits");
        self.rt.send(peer, key, frame).map(|_| ()).expect("sent");
    }

    fn failures(&self) -> u64 {
        self.rt.listener_stats().handshake_failures
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.rt.stop();
    }
}

fn handshake_reason(result: Result<(), OpenError>) -> &'static str {
    match result {
        Err(e) => match (e.class(), e.detail()) {
            ("handshake", Detail::Name(reason)) => reason,
            _ => panic!("not a handshake failure: {e:?}"),
        },
        Ok(()) => panic!("the pool opened"),
    }
}

fn wait_counted(node: &Node, at_least: u64) -> bool {
    let deadline = Instant::now() + WAIT;
    while node.failures() < at_least {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// A body that says where it is in its stream.
fn body(seq: u32, len: usize) -> Vec<u8> {
    let mut body = vec![(seq % 251) as u8; len.max(4)];
    body[..4].copy_from_slice(&seq.to_be_bytes());
    body
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn pools_over_tls_carry_small_and_large_frames_in_order_both_ways() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    let b = Node::start(
        "b@127.0.0.1",
        Some(node_tls(&dir, "b@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    a.open(&b, 2).expect("a -> b over TLS");
    b.open(&a, 2).expect("b -> a over TLS");

    // One key: one connection, so one order. Every tenth frame is large (multi-record,
    // read into the handler's own buffer), the rest small.
    let sizes: Vec<usize> = (0..300)
        .map(|i| if i % 10 == 5 { 3 << 20 } else { 100 + i })
        .collect();
    let total: usize = sizes.iter().sum();
    for (seq, len) in sizes.iter().enumerate() {
        a.send(b.name(), 7, body(seq as u32, *len));
        b.send(a.name(), 7, body(seq as u32, *len));
    }
    for (to, from) in [(&b, a.name()), (&a, b.name())] {
        assert!(
            to.host.wait_for(|log| log.frames.len() >= sizes.len()),
            "frames arrive; events: {}",
            to.host.events()
        );
        let log = to.host.0 .0.lock().unwrap();
        for (seq, (peer, got)) in log.frames.iter().enumerate() {
            assert_eq!(peer, from);
            assert_eq!(
                *got,
                body(seq as u32, sizes[seq]),
                "frame {seq} intact and in order"
            );
        }
        assert_eq!(log.owned, 30, "large bodies went to the handler's buffers");
    }
    let stats = a.rt.stats();
    let to_b = &stats.iter().find(|(p, _)| p == b.name()).expect("stats for b").1;
    assert_eq!(to_b.messages_out, sizes.len() as u64);
    assert_eq!(to_b.bytes_out, total as u64);
    assert_eq!(a.failures(), 0);
    assert_eq!(b.failures(), 0);
}

/// `a`, certified by and trusting only "ours"; `c`, certified by "theirs" and trusting
/// both, so only a's check can refuse.
fn ours_and_theirs(dir: &Dir) -> (Node, Node) {
    let (ours, theirs) = (ca("ours"), ca("theirs"));
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(dir, "a@127.0.0.1", &ours, LOOPBACK, &[&ours])),
    );
    let c = Node::start(
        "c@127.0.0.1",
        Some(node_tls(dir, "c@127.0.0.1", &theirs, LOOPBACK, &[&ours, &theirs])),
    );
    (a, c)
}

#[test]
fn a_server_from_another_ca_is_refused_by_the_client_and_counted_by_the_server() {
    let dir = Dir::new();
    let (a, c) = ours_and_theirs(&dir);
    assert_eq!(handshake_reason(a.open(&c, 1)), "tls_unknown_ca");
    assert!(wait_counted(&c, 1), "c counts the refusal");
    assert!(c.host.wait_refused("tls_unknown_ca"), "{}", c.host.events());
    assert!(c.host.wait_for(|log| log.frames.is_empty()));
}

#[test]
fn a_client_from_another_ca_is_refused_and_counted() {
    let dir = Dir::new();
    let (a, c) = ours_and_theirs(&dir);
    assert_eq!(handshake_reason(c.open(&a, 1)), "tls_unknown_ca");
    assert!(wait_counted(&a, 1), "a counts the refusal: {}", a.host.events());
    assert!(a.host.wait_refused("tls_unknown_ca"), "{}", a.host.events());
}

#[test]
fn an_expired_client_certificate_is_refused_and_counted() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    let old = Leaf {
        expired: true,
        ..LOOPBACK
    };
    let c = Node::start(
        "c@127.0.0.1",
        Some(node_tls(&dir, "c@127.0.0.1", &ca, old, &[&ca])),
    );
    assert_eq!(handshake_reason(c.open(&a, 1)), "tls_expired");
    assert!(wait_counted(&a, 1));
    assert!(a.host.wait_refused("tls_expired"), "{}", a.host.events());
    // And the other way: a refuses c's expired server certificate.
    assert_eq!(handshake_reason(a.open(&c, 1)), "tls_expired");
}

#[test]
fn a_client_without_a_certificate_is_refused_and_counted() {
    let dir = Dir::new();
    let ca_ = ca("cluster CA");
    let tls = node_tls(&dir, "a@127.0.0.1", &ca_, LOOPBACK, &[&ca_]);
    let a = Node::start("a@127.0.0.1", Some(tls.clone()));
    // A rustls client that trusts a's CA and has no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&tls.cacertfile).unwrap();
    for cert in rustls_pemfile_certs(&pem) {
        roots.add(cert).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let socket = TcpStream::connect(a.addr()).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, socket);
    let _ = stream.write_all(b"hello");
    let mut buf = [0u8; 16];
    assert!(stream.read(&mut buf).is_err() || stream.read(&mut buf).unwrap_or(0) == 0);
    assert!(wait_counted(&a, 1));
    assert!(a.host.wait_refused("tls_no_certificate"), "{}", a.host.events());
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_plain_text_client_is_refused_and_counted_and_nothing_is_delivered() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    // A teleport client without TLS, with the right cookie.
    let socket = TcpStream::connect(a.addr()).unwrap();
    let cfg = HandshakeConfig {
        cookie: COOKIE,
        local_node: "c@127.0.0.1",
        timeout: WAIT,
    };
    assert!(client_handshake(&socket, &cfg, a.name()).is_err());
    assert!(wait_counted(&a, 1));
    assert!(a.host.wait_refused("tls_plaintext"), "{}", a.host.events());
    let log = a.host.0 .0.lock().unwrap();
    assert!(log.frames.is_empty());
    assert!(!log.events.iter().any(|e| matches!(e, Event::InboundUp { .. })));
}

#[test]
fn a_tls_client_at_a_plain_text_listener_is_refused_and_counted() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    let p = Node::start("p@127.0.0.1", None);
    let error = a.open(&p, 1).expect_err("refused");
    assert_eq!(error.class(), "handshake", "{error:?}");
    assert!(wait_counted(&p, 1));
    // And the other way: a plain-text client at a's TLS listener.
    let error = p.open(&a, 1).expect_err("refused");
    assert_eq!(error.class(), "handshake", "{error:?}");
    assert!(a.host.wait_refused("tls_plaintext"), "{}", a.host.events());
}

#[test]
fn the_server_name_is_checked_against_the_dialed_host_unless_turned_off() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    // b's certificate names another host than the one in its node name.
    let elsewhere = Leaf {
        names: &["b.example.org"],
        expired: false,
    };
    let b = Node::start(
        "b@127.0.0.1",
        Some(node_tls(&dir, "b@127.0.0.1", &ca, elsewhere, &[&ca])),
    );
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    assert_eq!(handshake_reason(a.open(&b, 1)), "tls_bad_hostname");
    assert!(wait_counted(&b, 1));

    let mut unchecked = node_tls(&dir, "d@127.0.0.1", &ca, LOOPBACK, &[&ca]);
    unchecked.server_name_check = false;
    let d = Node::start("d@127.0.0.1", Some(unchecked));
    d.open(&b, 1).expect("names not checked");
    d.send(b.name(), 1, b"over TLS".to_vec());
    assert!(b
        .host
        .wait_for(|log| log.frames.iter().any(|(_, body)| body == b"over TLS")));
}

#[test]
fn verify_none_still_encrypts_and_connects_without_checks() {
    let dir = Dir::new();
    let (one, two) = (ca("one"), ca("two"));
    let mut ta = node_tls(&dir, "a@127.0.0.1", &one, LOOPBACK, &[&one]);
    let mut tb = node_tls(&dir, "b@127.0.0.1", &two, LOOPBACK, &[&two]);
    ta.verify_peer = false;
    tb.verify_peer = false;
    let a = Node::start("a@127.0.0.1", Some(ta));
    let b = Node::start("b@127.0.0.1", Some(tb));
    a.open(&b, 1).expect("no checks");
    a.send(b.name(), 1, b"unchecked".to_vec());
    assert!(b.host.wait_for(|log| log.frames.len() == 1));
}

#[test]
fn bad_files_and_settings_refuse_to_start() {
    let dir = Dir::new();
    let ca_ = ca("cluster CA");
    let good = node_tls(&dir, "a@127.0.0.1", &ca_, LOOPBACK, &[&ca_]);
    let other = node_tls(&dir, "b@127.0.0.1", &ca_, LOOPBACK, &[&ca_]);
    let start = |tls: TlsConfig| {
        let mut config = Config::for_tests("a@127.0.0.1", COOKIE);
        config.tls = Some(tls);
        Runtime::start(config, Arc::new(TestHost::default())).map(|rt| rt.stop())
    };
    let missing = TlsConfig {
        certfile: Path::new("/nonexistent/cert.pem").to_path_buf(),
        ..good.clone()
    };
    let e = start(missing).expect_err("missing certfile");
    assert!(e.to_string().contains("certfile"), "{e}");
    let mismatched = TlsConfig {
        keyfile: other.keyfile.clone(),
        ..good.clone()
    };
    assert!(start(mismatched).is_err(), "key of another certificate");
    let garbage = TlsConfig {
        cacertfile: dir.write("garbage.pem", "not a pem"),
        ..good.clone()
    };
    assert!(start(garbage).is_err());
    let ciphers = TlsConfig {
        ciphers: vec!["TLS_RSA_WITH_RC4_128_MD5".to_string()],
        ..good.clone()
    };
    assert!(start(ciphers).is_err());
    let one_suite = TlsConfig {
        ciphers: vec!["TLS_CHACHA20_POLY1305_SHA256".to_string()],
        ..good
    };
    assert!(start(one_suite).is_ok());
}

#[test]
fn a_slow_reader_holds_tls_senders_back_at_the_queue_limit_and_nothing_is_lost() {
    const LIMIT: usize = 1 << 20;
    const FRAME: usize = 60 * 1024;
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let mut config = Config::for_tests("a@127.0.0.1", COOKIE);
    config.tls = Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca]));
    config.send_queue_bytes = LIMIT;
    let host = TestHost::default();
    let a = Node {
        rt: Runtime::start(config, Arc::new(host.clone())).expect("starts"),
        host,
    };
    let b = Node::start(
        "b@127.0.0.1",
        Some(node_tls(&dir, "b@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    b.host.1.store(2, SeqCst);
    a.open(&b, 1).expect("pool opens");

    let started = Instant::now();
    let mut sent = 0u32;
    let conn = loop {
        assert!(started.elapsed() < WAIT, "never went over the limit");
        let frame = OutFrame::new(FrameKind::Send, Box::new(body(sent, FRAME))).expect("fits");
        let result = a.rt.send(b.name(), 3, frame).expect("sent");
        sent += 1;
        let queued =
            a.rt.stats()
                .into_iter()
                .find(|(p, _)| p == b.name())
                .map_or(0, |(_, s)| s.queued_bytes as usize);
        assert!(queued <= LIMIT + FRAME + 5, "queued {queued} bytes");
        if let teleport_net::Sent::OverLimit(conn) = result {
            break conn;
        }
    };
    let (tx, rx) = mpsc::channel();
    if conn.wait_for_drain(Box::new(move |()| {
        let _ = tx.send(());
    })) {
        rx.recv_timeout(WAIT).expect("woken once drained");
    }
    b.host.1.store(0, SeqCst);
    assert!(b.host.wait_for(|log| log.frames.len() == sent as usize));
    let log = b.host.0 .0.lock().unwrap();
    for (seq, (_, got)) in log.frames.iter().enumerate() {
        assert_eq!(*got, body(seq as u32, FRAME), "frame {seq}");
    }
}

#[test]
fn a_deferred_frame_pauses_its_tls_connection_and_the_rest_follows_in_order() {
    let dir = Dir::new();
    let ca = ca("cluster CA");
    let a = Node::start(
        "a@127.0.0.1",
        Some(node_tls(&dir, "a@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    let b = Node::start(
        "b@127.0.0.1",
        Some(node_tls(&dir, "b@127.0.0.1", &ca, LOOPBACK, &[&ca])),
    );
    a.open(&b, 1).expect("pool opens");
    let bodies: Vec<Vec<u8>> = vec![
        b"one".to_vec(),
        b"defer".to_vec(),
        b"two".to_vec(),
        vec![7u8; 300 * 1024],
        b"three".to_vec(),
    ];
    for body in &bodies {
        a.send(b.name(), 5, body.clone());
    }
    assert!(b.host.wait_for(|log| log.deferred.len() == 1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        b.host.0 .0.lock().unwrap().frames.len(),
        2,
        "nothing after the deferred frame yet"
    );
    let resume = b.host.0 .0.lock().unwrap().deferred.pop().expect("deferred");
    resume.finish(Ok(Delivery::Delivered));
    assert!(b.host.wait_for(|log| log.frames.len() == bodies.len()));
    let got: Vec<Vec<u8>> = b
        .host
        .0
         .0
        .lock()
        .unwrap()
        .frames
        .iter()
        .map(|(_, f)| f.clone())
        .collect();
    assert_eq!(got, bodies);
}
