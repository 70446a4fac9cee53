//! Both sides of the handshake fed a peer's bytes (see teleport_net::fuzzing::handshake).
//! The client's proof covers its node name, so the server side may only ever let in the
//! one client our cookie signs for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teleport_net::fuzzing::{handshake, Accepted, CLIENT_NODE};

fuzz_target!(|data: &[u8]| {
    if let Ok(Accepted::Server(name)) = handshake(data) {
        assert_eq!(name, CLIENT_NODE);
    }
});
