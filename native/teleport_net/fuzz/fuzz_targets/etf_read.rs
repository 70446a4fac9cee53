//! One frame body through the term parser (see teleport_net::fuzzing::etf_read).
//! A term read must survive a write and a re-read.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(term) = teleport_net::fuzzing::etf_read(data) {
        common::assert_round_trip(&term, "term");
    }
});
