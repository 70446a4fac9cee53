//! Property tests of the term parser (`etf::read` with the `Value` builder):
//! random terms written by the test writer (tests/common) read back equal, and
//! random mutations of those encodings never panic and never make the parser
//! allocate more than a fixed multiple of the input's size, whatever lengths the
//! mutated bytes claim.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::collection::vec;
use proptest::prelude::*;
use teleport_net::etf::value::{read_value, Float, Value};

/// Counts the bytes this thread asks the allocator for, so a test can bound what
/// one parse allocates (other test threads do not disturb the count).
struct Counting;

thread_local! {
    static REQUESTED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: nothing to count once the thread's locals are gone.
    let _ = REQUESTED.try_with(|n| n.set(n.get().saturating_add(bytes)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes requested from the allocator while `f` runs on this thread.
fn allocated_by<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = REQUESTED.with(Cell::get);
    let out = f();
    (out, REQUESTED.with(Cell::get) - before)
}

/// What one input byte may cost at most: a `Value` in the builder's arena and in its
/// container, the parser's stack slot, and the doubling of each of those vectors.
const BYTES_PER_INPUT_BYTE: usize = 512;
const FIXED_BYTES: usize = 4096;

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i32>().prop_map(Value::Int),
        (0..=255i32).prop_map(Value::Int),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| Value::Float(Float(f))),
        "[a-z_]{0,12}|[a-zA-Z0-9éß日本@.]{0,40}".prop_map(Value::Atom),
        Just(Value::Nil),
        vec(any::<u8>(), 0..80).prop_map(Value::Binary),
        // A bignum: opaque to the parser, whole and length-checked.
        (vec(any::<u8>(), 1..12), 0..2u8).prop_map(|(digits, sign)| {
            let mut bytes = vec![teleport_net::etf::SMALL_BIG_EXT, digits.len() as u8, sign];
            bytes.extend(digits);
            Value::Opaque(bytes)
        }),
    ]
}

/// Terms in the parser's canonical shape: lists have items and a tail that is not a
/// list, map keys differ.
fn term() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 200, 12, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..12).prop_map(Value::Tuple),
            vec(inner.clone(), 300..320).prop_map(Value::Tuple),
            (vec(inner.clone(), 1..12), inner.clone()).prop_map(|(items, tail)| {
                let tail = match tail {
                    Value::List(..) => Value::Nil,
                    other => other,
                };
                Value::List(items, Box::new(tail))
            }),
            vec((0..=255i32).prop_map(Value::Int), 1..40)
                .prop_map(|bytes| Value::List(bytes, Box::new(Value::Nil))),
            vec((inner.clone(), inner), 0..10).prop_map(|pairs| {
                let mut seen = std::collections::BTreeSet::new();
                let unique = pairs
                    .into_iter()
                    .filter(|(k, _)| seen.insert(k.clone()))
                    .collect();
                Value::Map(unique)
            }),
        ]
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    /// Four bytes of a claimed length: huge, zero, or just past the end.
    Length {
        at: usize,
        len: u32,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        byte: u8,
    },
    Remove {
        at: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    let byte = prop_oneof![
        any::<u8>(),
        Just(0u8),
        Just(0xff),
        Just(131),
        Just(104),
        Just(108),
        Just(116)
    ];
    prop_oneof![
        (at, 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (at, byte.clone()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (
            at,
            prop_oneof![Just(u32::MAX), Just(0x7fff_ffff), Just(0), any::<u32>()]
        )
            .prop_map(|(at, len)| Mutation::Length { at, len }),
        at.prop_map(|at| Mutation::Truncate { at }),
        (at, byte).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        at.prop_map(|at| Mutation::Remove { at }),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match *mutation {
        Mutation::Flip { at, bit } => bytes[at % len] ^= 1 << bit,
        Mutation::Set { at, byte } => bytes[at % len] = byte,
        Mutation::Length { at, len: claimed } => {
            let at = at % len;
            for (i, b) in claimed.to_be_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = b;
                }
            }
        }
        Mutation::Truncate { at } => bytes.truncate(at % len),
        Mutation::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
        Mutation::Remove { at } => {
            bytes.remove(at % len);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn written_terms_read_back_equal(value in term()) {
        // Panics on a difference; proptest shrinks panics like failed assertions.
        common::assert_round_trip(&value, "random term");
    }

    #[test]
    fn mutated_encodings_never_panic_or_overallocate(
        value in term(),
        mutations in vec(mutation(), 1..6),
    ) {
        let mut bytes = common::write(&value);
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        let (outcome, allocated) = allocated_by(|| read_value(&bytes).is_ok());
        let bound = BYTES_PER_INPUT_BYTE * bytes.len() + FIXED_BYTES;
        prop_assert!(
            allocated <= bound,
            "{} input bytes made the parser allocate {} bytes (bound {}), outcome ok: {}",
            bytes.len(), allocated, bound, outcome
        );
    }
}

/// Lengths that claim the whole address space are refused before anything is sized by them.
#[test]
fn huge_claimed_lengths_allocate_nothing_large() {
    let cases: [&[u8]; 6] = [
        &[131, 108, 255, 255, 255, 255, 106],
        &[131, 105, 255, 255, 255, 255],
        &[131, 116, 127, 255, 255, 255, 97, 1],
        &[131, 109, 255, 255, 255, 255, 0],
        &[131, 107, 255, 255, 1, 2, 3],
        &[131, 111, 255, 255, 255, 255, 0],
    ];
    for bytes in cases {
        let (outcome, allocated) = allocated_by(|| read_value(bytes));
        assert!(outcome.is_err(), "{bytes:?} parsed: {outcome:?}");
        assert!(allocated <= FIXED_BYTES, "{bytes:?} allocated {allocated} bytes");
    }
}

/// The bound is not vacuous: a valid term of many small items costs real memory.
#[test]
fn allocation_count_sees_the_parser() {
    let value = Value::List(
        (0..1000).map(|i| Value::Int(i + 300)).collect(),
        Box::new(Value::Nil),
    );
    let bytes = common::write(&value);
    let (outcome, allocated) = allocated_by(|| read_value(&bytes));
    assert_eq!(outcome, Ok(value));
    assert!(
        allocated >= bytes.len(),
        "only {allocated} bytes counted for {} input bytes",
        bytes.len()
    );
}
