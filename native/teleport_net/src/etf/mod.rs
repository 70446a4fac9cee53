//! The external term format (version 131), free of the VM: the tags, a parser
//! (`read`) and the byte-level writer (`write`). The NIF crate walks and builds
//! VM terms on top of these, so the parts that face the network and the parts
//! that produce the wire bytes can be fuzzed and property-tested without a VM.
//! `value` builds plain Rust terms with the parser, for those tests.

pub mod read;
pub mod value;
pub mod write;

pub const VERSION: u8 = 131;
/// OTP 29's native records (`#Name{...}`): `[u32 fields][u8 flags]`, module, name,
/// the field names, the values.
pub const RECORD_EXT: u8 = 67;
pub const NEW_FLOAT_EXT: u8 = 70;
pub const BIT_BINARY_EXT: u8 = 77;
pub const NEW_PID_EXT: u8 = 88;
pub const NEW_PORT_EXT: u8 = 89;
pub const NEWER_REFERENCE_EXT: u8 = 90;
pub const SMALL_INTEGER_EXT: u8 = 97;
pub const INTEGER_EXT: u8 = 98;
pub const FLOAT_EXT: u8 = 99;
pub const ATOM_EXT: u8 = 100;
pub const REFERENCE_EXT: u8 = 101;
pub const PORT_EXT: u8 = 102;
pub const PID_EXT: u8 = 103;
pub const SMALL_TUPLE_EXT: u8 = 104;
pub const LARGE_TUPLE_EXT: u8 = 105;
pub const NIL_EXT: u8 = 106;
pub const STRING_EXT: u8 = 107;
pub const LIST_EXT: u8 = 108;
pub const BINARY_EXT: u8 = 109;
pub const SMALL_BIG_EXT: u8 = 110;
pub const LARGE_BIG_EXT: u8 = 111;
pub const NEW_FUN_EXT: u8 = 112;
pub const EXPORT_EXT: u8 = 113;
pub const NEW_REFERENCE_EXT: u8 = 114;
pub const SMALL_ATOM_EXT: u8 = 115;
pub const MAP_EXT: u8 = 116;
pub const ATOM_UTF8_EXT: u8 = 118;
pub const SMALL_ATOM_UTF8_EXT: u8 = 119;
pub const V4_PORT_EXT: u8 = 120;

/// The oldest Erlang/OTP release that reads a term whose external format starts with
/// `tag`: 0 for the tags every supported release reads, `u16::MAX` for a tag this
/// code does not know (a type newer than it). A sender checks what it sends against
/// the release its peer runs.
pub fn release_reading(tag: u8) -> u16 {
    match tag {
        RECORD_EXT => 29,
        NEW_FLOAT_EXT | BIT_BINARY_EXT | NEW_PID_EXT | NEW_PORT_EXT | NEWER_REFERENCE_EXT
        | SMALL_INTEGER_EXT | INTEGER_EXT | FLOAT_EXT | ATOM_EXT | REFERENCE_EXT | PORT_EXT | PID_EXT
        | SMALL_TUPLE_EXT | LARGE_TUPLE_EXT | NIL_EXT | STRING_EXT | LIST_EXT | BINARY_EXT
        | SMALL_BIG_EXT | LARGE_BIG_EXT | NEW_FUN_EXT | EXPORT_EXT | NEW_REFERENCE_EXT | SMALL_ATOM_EXT
        | MAP_EXT | ATOM_UTF8_EXT | SMALL_ATOM_UTF8_EXT | V4_PORT_EXT => 0,
        _ => u16::MAX,
    }
}

/// Whether a VM of this erts version ("13.1.5") crashes building a map of over 128 keys
/// on a thread that is not a scheduler (erlang/otp GH-8208, fixed by OTP-19495 in erts
/// 13.2.2.14, 14.2.5.8 and 15.2.3; introduced in 13.1). The NIF's decoder runs on such
/// threads. An unreadable version counts as affected.
pub fn erts_has_large_map_bug(version: &str) -> bool {
    let parts: Vec<u32> = version.split('.').map_while(|p| p.parse().ok()).collect();
    if parts.is_empty() {
        return true;
    }
    let v = |i: usize| parts.get(i).copied().unwrap_or(0);
    let at_least = |want: &[u32]| {
        (0..4)
            .map(v)
            .cmp(want.iter().copied().chain([0; 4]).take(4))
            .is_ge()
    };
    match v(0) {
        13 => at_least(&[13, 1]) && !at_least(&[13, 2, 2, 14]),
        14 => !at_least(&[14, 2, 5, 8]),
        15 => !at_least(&[15, 2, 3]),
        _ => false,
    }
}

#[cfg(test)]
mod large_map_bug_tests {
    use super::erts_has_large_map_bug;

    #[test]
    fn large_map_bug_versions() {
        for v in [
            "13.1",
            "13.1.5",
            "13.2",
            "13.2.2.13",
            "14.0",
            "14.2.5.7",
            "15.0",
            "15.2.2",
            "15.2.2.1",
        ] {
            assert!(erts_has_large_map_bug(v), "{v}");
        }
        for v in [
            "13.0",
            "13.0.4",
            "13.2.2.14",
            "13.2.2.20",
            "14.2.5.8",
            "14.2.6",
            "15.2.3",
            "15.2.7",
            "16.0",
            "17.1.1",
        ] {
            assert!(!erts_has_large_map_bug(v), "{v}");
        }
        assert!(erts_has_large_map_bug("garbage"));
    }
}
