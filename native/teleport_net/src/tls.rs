//! Optional TLS 1.3 on every connection (`Config::tls`), with rustls (ring provider):
//! each side presents its certificate and checks the other's chain against the
//! configured CAs. A connection's bytes go through its `Session`: the TLS handshake
//! runs first (rustls buffers what is written before it is done), then the cookie
//! handshake inside TLS, then frames. Only the connection's I/O thread touches a
//! session, so senders never write to a TLS socket directly.
//!
//! Copies: written frames are encrypted from their own slices into rustls' record
//! buffer (the cipher's copy: nothing is gathered first) and go out from there.
//! Received records are decrypted in place in rustls' read buffer, and rustls 0.23 then
//! copies each record's plaintext into a queue of its own (`into_vec`; its unbuffered
//! API does the same, pending in-place decryption upstream). Small frames are parsed
//! and delivered from that queue (`fill_plain`, no copy of ours); a large body is
//! copied from it once into its own buffer. So a large body costs one copy more than
//! the cipher needs, forced by rustls; nothing else is copied.
//!
//! Failures carry stable names (`tls_unknown_ca`, `tls_expired`, ...), never text from
//! the peer.

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::config::TlsConfig;
use crate::error::named_failure;
use crate::socket::SendNoSignal;

/// rustls' encrypted output waiting for the socket is kept under about this much: a
/// connection takes frames from its queue (where senders are held back at
/// `send_queue_bytes`) only while there is room.
const PENDING_TLS_BYTES: usize = 256 * 1024;

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Suites by their IANA names, as `ciphers` takes them.
pub const CIPHER_SUITES: [&str; 3] = [
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
];

/// The configurations made once at start, shared by every connection.
pub(crate) struct TlsContext {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl TlsContext {
    /// Reads the files and builds both sides' configurations; an error says which
    /// file or setting is wrong.
    pub fn load(config: &TlsConfig) -> Result<TlsContext, String> {
        let provider = Arc::new(provider(&config.ciphers)?);
        let certs = read_certs(&config.certfile, "certfile")?;
        let key = PrivateKeyDer::from_pem_file(&config.keyfile)
            .map_err(|e| format!("keyfile {}: {e}", config.keyfile.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&config.cacertfile, "cacertfile")? {
            roots
                .add(ca)
                .map_err(|e| format!("cacertfile {}: {e}", config.cacertfile.display()))?;
        }
        let roots = Arc::new(roots);
        let bad = |what: &'static str| move |e: rustls::Error| format!("{what}: {e}");

        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad("tls"))?;
        let builder = if config.verify_peer {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| format!("cacertfile {}: {e}", config.cacertfile.display()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut server = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(bad("certfile and keyfile"))?;
        // Connections are long-lived and never resumed.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let chain = if config.verify_peer {
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("cacertfile {}: {e}", config.cacertfile.display()))?;
            Some(webpki)
        } else {
            None
        };
        let verifier = Arc::new(ServerVerifier {
            chain,
            check_name: config.server_name_check,
            provider: provider.clone(),
        });
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(bad("tls"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(bad("certfile and keyfile"))?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsContext {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// A session for dialing `peer_node`: the server's certificate must name its host
    /// (unless `server_name_check` is off).
    pub fn client(&self, peer_node: &str) -> io::Result<Session> {
        let host = peer_node.split_once('@').map_or(peer_node, |(_, host)| host);
        // Without the check any name does: a host that is no DNS name is not refused.
        let name = ServerName::try_from(host.to_string())
            .or_else(|_| ServerName::try_from("teleport.invalid".to_string()))
            .map_err(|e| failure("tls_bad_hostname", e.to_string()))?;
        let conn = rustls::ClientConnection::new(self.client.clone(), name)
            .map_err(|e| failure(reason_of(&e), e.to_string()))?;
        Ok(Session::new(conn.into(), false))
    }

    /// A session for an accepted connection.
    pub fn server(&self) -> io::Result<Session> {
        let conn = rustls::ServerConnection::new(self.server.clone())
            .map_err(|e| failure(reason_of(&e), e.to_string()))?;
        Ok(Session::new(conn.into(), true))
    }
}

fn provider(ciphers: &[String]) -> Result<CryptoProvider, String> {
    // Deprecated in 0.23.48 only to point at aws-lc-rs (post-quantum key exchange),
    // which needs cmake and more C; ring's X25519 and P-256/P-384 are what TLS 1.3
    // peers offer today.
    #[allow(deprecated)]
    let mut provider = ring::default_provider();
    // Key exchange by X25519 or P-256, never P-384, rustls 0.23.48's first choice: with
    // ring it takes ~0.8 ms against ~0.07 ms (the project's 2-core machine), for the
    // server as for the client, and a listener that took it would let a client offering
    // only it make every handshake cost that much. A client offering it first (an older
    // teleport) is asked for X25519 instead (a HelloRetryRequest, no key exchange).
    provider.kx_groups = vec![ring::kx_group::X25519, ring::kx_group::SECP256R1];
    if !ciphers.is_empty() {
        for name in ciphers {
            if !CIPHER_SUITES.contains(&name.as_str()) {
                return Err(format!("ciphers: unknown TLS 1.3 suite {name:?}"));
            }
        }
        provider
            .cipher_suites
            .retain(|suite| iana_name(suite.suite()).is_some_and(|name| ciphers.iter().any(|c| c == name)));
    }
    provider
        .cipher_suites
        .retain(|suite| suite.version() == &rustls::version::TLS13);
    if provider.cipher_suites.is_empty() {
        return Err("ciphers: no TLS 1.3 suite left".to_string());
    }
    Ok(provider)
}

fn iana_name(suite: rustls::CipherSuite) -> Option<&'static str> {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_256_GCM_SHA384 => Some(CIPHER_SUITES[0]),
        S::TLS13_AES_128_GCM_SHA256 => Some(CIPHER_SUITES[1]),
        S::TLS13_CHACHA20_POLY1305_SHA256 => Some(CIPHER_SUITES[2]),
        _ => None,
    }
}

fn read_certs(path: &std::path::Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// How a dialing node checks the server's certificate: its chain must lead to our CAs
/// and, unless told not to, name the host dialed; with `verify => verify_none`
/// (`chain` none) any certificate passes. The handshake's signatures are checked either
/// way, so the key exchange is with the certificate's holder.
#[derive(Debug)]
struct ServerVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the chain (and the dates) before the name: a name error
            // means all else was fine.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether the certificate (DER) names the host part of `node` (`name@host`), as a DNS
/// name or an IP address, by the rules a server's name is checked with (its chain was
/// checked by the TLS handshake).
pub fn certifies_host(cert: &[u8], node: &str) -> bool {
    let host = node.split_once('@').map_or(node, |(_, host)| host);
    let der = CertificateDer::from(cert);
    let (Ok(name), Ok(cert)) = (ServerName::try_from(host), webpki::EndEntityCert::try_from(&der)) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// A TLS failure: its stable name and, for logs, rustls' words.
fn failure(reason: &'static str, message: String) -> io::Error {
    named_failure(reason, format!("TLS: {message}"))
}

/// Our name for a rustls error, whether we found the fault or the peer's alert said so.
fn reason_of(e: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    use AlertDescription as A;
    use CertificateError as C;
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => "tls_unknown_ca",
        E::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => "tls_expired",
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => "tls_bad_hostname",
        E::InvalidCertificate(_) => "tls_bad_certificate",
        E::NoCertificatesPresented => "tls_no_certificate",
        E::AlertReceived(A::UnknownCA) => "tls_unknown_ca",
        E::AlertReceived(A::CertificateExpired) => "tls_expired",
        E::AlertReceived(A::CertificateRequired) => "tls_no_certificate",
        E::AlertReceived(
            A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::DecryptError,
        ) => "tls_bad_certificate",
        E::AlertReceived(A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity) => {
            "tls_incompatible"
        }
        E::AlertReceived(_) => "tls_alert",
        E::PeerIncompatible(_) => "tls_incompatible",
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            "tls_protocol"
        }
        _ => "tls_error",
    }
}

/// One connection's TLS state.
pub(crate) struct Session {
    conn: rustls::Connection,
    /// Server: the client's first byte is still to be checked (a plain-text client).
    check_first: bool,
}

impl Session {
    /// The peer's certificate (DER), once the TLS handshake is done.
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        self.conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|cert| cert.as_ref().to_vec())
    }

    /// The value the handshake's proofs sign (RFC 5705 export): the same at both ends
    /// of one TLS session, different for any other session.
    pub fn channel_binding(&self) -> io::Result<crate::handshake::ChannelBinding> {
        self.conn
            .export_keying_material(
                [0u8; crate::handshake::CHANNEL_BINDING_LEN],
                crate::handshake::CHANNEL_BINDING_LABEL,
                None,
            )
            .map_err(io::Error::other)
    }

    fn new(mut conn: rustls::Connection, server: bool) -> Session {
        conn.set_buffer_limit(Some(PENDING_TLS_BYTES));
        Session {
            conn,
            check_first: server,
        }
    }

    /// Writes rustls' pending output; true once none is left, false if the socket is full.
    pub fn push(&mut self, socket: &TcpStream) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut SendNoSignal(socket)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads what the socket holds into rustls and processes it (answering what needs
    /// an answer); returns the bytes read, 0 at the end of the stream.
    fn pull(&mut self, socket: &TcpStream) -> io::Result<usize> {
        if self.check_first {
            let mut first = [0u8; 1];
            match socket.peek(&mut first) {
                Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => {
                    return Err(failure(
                        "tls_plaintext",
                        "the client does not speak TLS".to_string(),
                    ))
                }
                Ok(1) => self.check_first = false,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let n = loop {
            match self.conn.read_tls(&mut ReadSocket(socket)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other?,
            }
        };
        if let Err(e) = self.conn.process_new_packets() {
            // The alert rustls queued tells the peer why.
            let _ = self.push(socket);
            return Err(failure(reason_of(&e), e.to_string()));
        }
        self.push(socket)?;
        Ok(n)
    }

    /// Reads decrypted bytes; `WouldBlock` when there are none yet, 0 once the peer
    /// closed.
    pub fn read_plain(&mut self, socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Closed without close_notify: our peers close that way.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.pull(socket)? == 0 {
                if self.conn.is_handshaking() {
                    return Err(failure(
                        "tls_closed",
                        "the peer closed during the TLS handshake (does it speak TLS?)".to_string(),
                    ));
                }
                return match self.conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e)
                        if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                };
            }
        }
    }

    /// The next decrypted bytes where rustls holds them (no copy), reading the socket
    /// when there are none; `WouldBlock` when it is empty too, an empty slice once the
    /// peer closed. `consume_plain` says how many were used.
    pub fn fill_plain(&mut self, socket: &TcpStream) -> io::Result<&[u8]> {
        loop {
            // Only the length here: the slice is taken again below, outside the loop's
            // borrow.
            let available = match self.conn.reader().into_first_chunk() {
                Ok([]) => return Ok(&[]),
                Ok(chunk) => chunk.len(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(&[]),
                Err(e) => return Err(e),
            };
            if available > 0 {
                break;
            }
            if self.pull(socket)? == 0 {
                if self.conn.is_handshaking() {
                    return Err(failure(
                        "tls_closed",
                        "the peer closed during the TLS handshake (does it speak TLS?)".to_string(),
                    ));
                }
                match self.conn.reader().into_first_chunk() {
                    Ok(chunk) if !chunk.is_empty() => break,
                    Err(e)
                        if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::UnexpectedEof) =>
                    {
                        return Err(e)
                    }
                    _ => return Ok(&[]),
                }
            }
        }
        self.conn.reader().into_first_chunk()
    }

    /// `n` bytes of what `fill_plain` returned were used.
    pub fn consume_plain(&mut self, n: usize) {
        std::io::BufRead::consume(&mut self.conn.reader(), n);
    }

    /// Encrypts what of `slices` fits under `PENDING_TLS_BYTES` and writes out what the
    /// socket takes; `WouldBlock` when nothing fitted (the socket is full).
    pub fn write_plain(&mut self, socket: &TcpStream, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.push(socket)?;
        let n = self.conn.writer().write_vectored(slices)?;
        self.push(socket)?;
        if n == 0 && slices.iter().any(|s| !s.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Takes all of a small message (a handshake's, the pool's announcement): rustls
    /// keeps it until it can be sent, which the next writable event finishes.
    pub fn write_all_plain(&mut self, socket: &TcpStream, bytes: &[u8]) -> io::Result<()> {
        let mut at = 0;
        while at < bytes.len() {
            let n = self.conn.writer().write(&bytes[at..])?;
            if n == 0 {
                // Over the limit: only a full socket, for a message this small.
                self.conn.set_buffer_limit(None);
                continue;
            }
            at += n;
        }
        self.conn.set_buffer_limit(Some(PENDING_TLS_BYTES));
        self.push(socket).map(|_| ())
    }

    /// As a writer of frames for `SendQueue::flush_to`.
    pub fn writer<'a>(&'a mut self, socket: &'a TcpStream) -> PlainWriter<'a> {
        PlainWriter {
            session: self,
            socket,
        }
    }
}

/// Frames into a session (see `Session::write_plain`).
pub(crate) struct PlainWriter<'a> {
    session: &'a mut Session,
    socket: &'a TcpStream,
}

impl Write for PlainWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.session.write_plain(self.socket, &[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.session.write_plain(self.socket, bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct ReadSocket<'a>(&'a TcpStream);

impl Read for ReadSocket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}
