//! TLS where this build has none (see `Cargo.toml`: rustls and ring are built for Linux
//! and FreeBSD only): a runtime configured with TLS refuses to start.

use std::io::{self, IoSlice, Write};

use mio::net::TcpStream;

use crate::config::TlsConfig;

pub const CIPHER_SUITES: [&str; 3] = [
    "TLS_AES_256_GCM_SHA384",
    "TLS_AES_128_GCM_SHA256",
    "TLS_CHACHA20_POLY1305_SHA256",
];

pub(crate) enum TlsContext {}

impl TlsContext {
    pub fn load(_config: &TlsConfig) -> Result<TlsContext, String> {
        Err("TLS is only built for Linux and FreeBSD".to_string())
    }

    pub fn client(&self, _peer_node: &str) -> io::Result<Session> {
        match *self {}
    }

    pub fn server(&self) -> io::Result<Session> {
        match *self {}
    }
}

pub fn certifies_host(_cert: &[u8], _node: &str) -> bool {
    false
}

pub(crate) enum Session {}

impl Session {
    pub fn peer_certificate(&self) -> Option<Vec<u8>> {
        match *self {}
    }

    pub fn channel_binding(&self) -> io::Result<crate::handshake::ChannelBinding> {
        match *self {}
    }

    pub fn push(&mut self, _socket: &TcpStream) -> io::Result<bool> {
        match *self {}
    }

    pub fn read_plain(&mut self, _socket: &TcpStream, _buf: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }

    pub fn fill_plain(&mut self, _socket: &TcpStream) -> io::Result<&[u8]> {
        match *self {}
    }

    pub fn consume_plain(&mut self, _n: usize) {
        match *self {}
    }

    pub fn write_all_plain(&mut self, _socket: &TcpStream, _bytes: &[u8]) -> io::Result<()> {
        match *self {}
    }

    pub fn writer<'a>(&'a mut self, _socket: &'a TcpStream) -> PlainWriter<'a> {
        match *self {}
    }
}

pub(crate) struct PlainWriter<'a>(&'a mut Session);

impl Write for PlainWriter<'_> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        match *self.0 {}
    }
    fn write_vectored(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match *self.0 {}
    }
    fn flush(&mut self) -> io::Result<()> {
        match *self.0 {}
    }
}
