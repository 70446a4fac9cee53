//! An authenticated inbound stream: pool token, frame headers, bodies read as terms
//! (see teleport_net::fuzzing::frames). Every term read must survive a write and a
//! re-read.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for term in &teleport_net::fuzzing::frames(data).terms {
        common::assert_round_trip(term, "frame body");
    }
});
