//! Parser of the external term format (version 131), free of the VM.
//!
//! `Reader::read` walks one whole term and hands every piece to a `TermBuilder`,
//! which makes whatever terms it likes: the NIF makes terms in an env, tests and
//! fuzzing make `value::Value`s. The builder is a type parameter, not a trait
//! object: the NIF's decoder is on the receive path and compiles to direct calls.
//!
//! The walk is iterative (containers wait on an explicit stack): a list nested a
//! million deep costs heap, not stack. Every length and count is checked against
//! the bytes left before anything sized by it is asked for, so what a builder
//! allocates is bounded by the input's size. Types the builder has no constructor
//! for (pids, ports, refs, funs, bignums, bitstrings, the old text floats) are
//! checked for length only and handed over whole, to be decoded elsewhere.

use std::fmt;

use super::*;

/// Makes terms out of the pieces `Reader::read` finds.
pub trait TermBuilder {
    /// A finished term; copied between the parser's stacks (a VM term, an index).
    type Term: Copy;

    fn int(&mut self, value: i32) -> Self::Term;
    /// Never NaN or infinite: the parser refuses those.
    fn float(&mut self, value: f64) -> Self::Term;
    /// `name` has at most 255 characters: Latin-1 bytes, or valid UTF-8 when `utf8`.
    fn atom(&mut self, utf8: bool, name: &[u8]) -> Result<Self::Term, ReadError>;
    fn nil(&mut self) -> Self::Term;
    /// STRING_EXT: the proper list of these bytes as integers (`[]` when empty).
    fn string(&mut self, bytes: &[u8]) -> Self::Term;
    /// `bytes` is `input[offset..offset + bytes.len()]`, so a builder may reference
    /// the input instead of copying.
    fn binary(&mut self, offset: usize, bytes: &[u8]) -> Self::Term;
    fn tuple(&mut self, elements: &[Self::Term]) -> Self::Term;
    /// `items` in front of `tail` (`nil` for a proper list). With no items, the term is `tail`.
    fn list(&mut self, items: &[Self::Term], tail: Self::Term) -> Self::Term;
    /// Keys and values, alternating. A key seen twice is an error.
    fn map(&mut self, flat: &[Self::Term]) -> Result<Self::Term, ReadError>;
    /// One whole term of a type with no constructor above, tag first, without the
    /// version byte. Its lengths are checked; its contents are the builder's to judge.
    fn opaque(&mut self, bytes: &[u8]) -> Result<Self::Term, ReadError>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The first byte is not 131.
    NoVersion,
    /// The input ends inside a term.
    Truncated {
        at: usize,
    },
    /// A count larger than the bytes left can hold.
    CountTooLarge {
        count: usize,
        at: usize,
    },
    /// The term ends before the input does.
    TrailingBytes {
        at: usize,
    },
    NonFiniteFloat,
    /// Over 255 characters, or a UTF-8 atom that is not UTF-8.
    BadAtom,
    /// A map with a key twice.
    DuplicateKeys,
    UnsupportedTag(u8),
    /// Lengths that do not add up inside a term of a known type.
    Malformed(&'static str),
    /// The builder refused an opaque term (tag given).
    Refused(u8),
    /// The builder cannot make this term on the thread it runs on (the caller may
    /// try the whole input again where it can).
    NeedsScheduler,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::NoVersion => f.write_str("not an external term (no version byte 131)"),
            ReadError::Truncated { at } => write!(f, "truncated term at byte {at}"),
            ReadError::CountTooLarge { count, at } => {
                write!(f, "count {count} larger than the input at byte {at}")
            }
            ReadError::TrailingBytes { at } => write!(f, "trailing bytes after the term at byte {at}"),
            ReadError::NonFiniteFloat => f.write_str("non-finite float"),
            ReadError::BadAtom => f.write_str("atom longer than 255 characters or not UTF-8"),
            ReadError::DuplicateKeys => f.write_str("map with duplicate keys"),
            ReadError::UnsupportedTag(tag) => write!(f, "unsupported term tag {tag}"),
            ReadError::Malformed(what) => write!(f, "malformed term: {what}"),
            ReadError::Refused(tag) => write!(f, "bad term with tag {tag}"),
            ReadError::NeedsScheduler => f.write_str("term must be built on a VM scheduler"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Parses whole terms; keeps its stacks between calls, so a reader that lives
/// as long as a connection allocates nothing per container once warmed up.
pub struct Reader<T> {
    /// Finished terms not yet in their container.
    values: Vec<T>,
    /// Containers waiting for their elements.
    open: Vec<Pending>,
    /// Most terms (containers included) one `read` builds or skips before it gives up
    /// with `NeedsScheduler` (see `with_step_limit`).
    step_limit: usize,
    /// What is left of it in the current `read`.
    steps_left: usize,
}

/// A container whose elements collect on the value stack from `start`.
struct Pending {
    shape: Shape,
    start: usize,
    /// Values it needs: a tuple's arity, a list's length plus its tail, a map's 2 x pairs.
    needed: usize,
}

#[derive(Clone, Copy)]
enum Shape {
    Tuple,
    List,
    Map,
}

/// What reading one term's head gave.
enum Step<T> {
    Done(T),
    /// A container was opened: its elements come next.
    Opened,
}

impl<T: Copy> Default for Reader<T> {
    fn default() -> Self {
        Reader {
            values: Vec::new(),
            open: Vec::new(),
            step_limit: usize::MAX,
            steps_left: usize::MAX,
        }
    }
}

/// Reads one whole term (version byte first) with a fresh `Reader`.
pub fn read<B: TermBuilder>(builder: &mut B, bytes: &[u8]) -> Result<B::Term, ReadError> {
    Reader::default().read(builder, bytes)
}

impl<T: Copy> Reader<T> {
    /// A reader that gives up with `ReadError::NeedsScheduler` once a term has more than
    /// `limit` terms in it: a thread serving many connections hands such a term to a
    /// scheduler instead of holding up the others while it builds it.
    pub fn with_step_limit(limit: usize) -> Self {
        Reader {
            step_limit: limit,
            ..Reader::default()
        }
    }

    /// Reads one whole term (version byte first, nothing after it).
    pub fn read<B: TermBuilder<Term = T>>(&mut self, builder: &mut B, bytes: &[u8]) -> Result<T, ReadError> {
        let mut input = Input { bytes, pos: 0 };
        if input.u8().ok() != Some(VERSION) {
            return Err(ReadError::NoVersion);
        }
        self.values.clear();
        self.open.clear();
        self.steps_left = self.step_limit;
        loop {
            self.step(1)?;
            match self.next(builder, &mut input)? {
                Step::Done(value) => self.values.push(value),
                Step::Opened => continue,
            }
            // Close every container that value completed.
            while let Some(top) = self.open.last() {
                if self.values.len() - top.start < top.needed {
                    break;
                }
                let elements = &self.values[top.start..];
                let built = match top.shape {
                    Shape::Tuple => builder.tuple(elements),
                    Shape::List => {
                        let (tail, items) = elements.split_last().ok_or(ReadError::Malformed("list"))?;
                        builder.list(items, *tail)
                    }
                    Shape::Map => builder.map(elements)?,
                };
                self.values.truncate(top.start);
                self.values.push(built);
                self.open.pop();
            }
            if self.open.is_empty() {
                if input.left() != 0 {
                    return Err(ReadError::TrailingBytes { at: input.pos });
                }
                return self.values.pop().ok_or(ReadError::Malformed("no term"));
            }
        }
    }

    /// Reads one term's head: a whole term, or the start of a container.
    fn next<B: TermBuilder<Term = T>>(
        &mut self,
        builder: &mut B,
        input: &mut Input,
    ) -> Result<Step<T>, ReadError> {
        let start = input.pos;
        let tag = input.u8()?;
        let term = match tag {
            SMALL_INTEGER_EXT => builder.int(i32::from(input.u8()?)),
            INTEGER_EXT => builder.int(i32::from_be_bytes(input.array()?)),
            NEW_FLOAT_EXT => {
                let f = f64::from_be_bytes(input.array()?);
                if !f.is_finite() {
                    return Err(ReadError::NonFiniteFloat);
                }
                builder.float(f)
            }
            ATOM_EXT | ATOM_UTF8_EXT => {
                let len = input.u16()?;
                let name = check_atom(tag == ATOM_UTF8_EXT, input.take(len)?)?;
                builder.atom(tag == ATOM_UTF8_EXT, name)?
            }
            SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => {
                let len = usize::from(input.u8()?);
                let name = check_atom(tag == SMALL_ATOM_UTF8_EXT, input.take(len)?)?;
                builder.atom(tag == SMALL_ATOM_UTF8_EXT, name)?
            }
            NIL_EXT => builder.nil(),
            STRING_EXT => {
                let len = input.u16()?;
                builder.string(input.take(len)?)
            }
            BINARY_EXT => {
                let len = input.u32()?;
                let offset = input.pos;
                builder.binary(offset, input.take(len)?)
            }
            SMALL_TUPLE_EXT | LARGE_TUPLE_EXT => {
                let arity = if tag == SMALL_TUPLE_EXT {
                    usize::from(input.u8()?)
                } else {
                    input.u32()?
                };
                let arity = input.count(arity, 1)?;
                if arity == 0 {
                    builder.tuple(&[])
                } else {
                    return Ok(self.open_container(Shape::Tuple, arity));
                }
            }
            LIST_EXT => {
                let len = input.u32()?;
                let len = input.count(len, 1)?;
                // The elements, then the tail (NIL for a proper list).
                return Ok(self.open_container(Shape::List, len + 1));
            }
            MAP_EXT => {
                let pairs = input.u32()?;
                let pairs = input.count(pairs, 2)?;
                if pairs == 0 {
                    builder.map(&[])?
                } else {
                    return Ok(self.open_container(Shape::Map, 2 * pairs));
                }
            }
            // OTP 29's native records: no constructor in the NIF API, so the builder
            // gets the whole record (which the VM's own decoder can build).
            RECORD_EXT => {
                let inner = record_inner_terms(input)?;
                self.skip_terms(input, inner)?;
                builder.opaque(&input.bytes[start..input.pos])?
            }
            _ => {
                skip_opaque(tag, input)?;
                builder.opaque(&input.bytes[start..input.pos])?
            }
        };
        Ok(Step::Done(term))
    }

    /// Counts `n` terms against the step limit.
    fn step(&mut self, n: usize) -> Result<(), ReadError> {
        self.steps_left = self.steps_left.checked_sub(n).ok_or(ReadError::NeedsScheduler)?;
        Ok(())
    }

    /// Advances past `n` whole terms of any type, checking their lengths, without
    /// building them; each counts against the step limit. Iterative: the terms still
    /// to skip are a count, not a stack.
    fn skip_terms(&mut self, input: &mut Input, mut n: usize) -> Result<(), ReadError> {
        while n > 0 {
            n -= 1;
            self.step(1)?;
            let tag = input.u8()?;
            // Each count is checked against the bytes left, so `n` stays below the
            // input's length.
            let inner = match tag {
                SMALL_INTEGER_EXT => input.take(1).map(|_| 0)?,
                INTEGER_EXT => input.take(4).map(|_| 0)?,
                NEW_FLOAT_EXT => input.take(8).map(|_| 0)?,
                ATOM_EXT | ATOM_UTF8_EXT => {
                    let len = input.u16()?;
                    check_atom(tag == ATOM_UTF8_EXT, input.take(len)?).map(|_| 0)?
                }
                SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => {
                    let len = usize::from(input.u8()?);
                    check_atom(tag == SMALL_ATOM_UTF8_EXT, input.take(len)?).map(|_| 0)?
                }
                NIL_EXT => 0,
                STRING_EXT => {
                    let len = input.u16()?;
                    input.take(len).map(|_| 0)?
                }
                BINARY_EXT => {
                    let len = input.u32()?;
                    input.take(len).map(|_| 0)?
                }
                SMALL_TUPLE_EXT => {
                    let arity = usize::from(input.u8()?);
                    input.count(arity, 1)?
                }
                LARGE_TUPLE_EXT => {
                    let arity = input.u32()?;
                    input.count(arity, 1)?
                }
                LIST_EXT => {
                    let len = input.u32()?;
                    input.count(len, 1)? + 1
                }
                MAP_EXT => {
                    let pairs = input.u32()?;
                    2 * input.count(pairs, 2)?
                }
                RECORD_EXT => record_inner_terms(input)?,
                _ => skip_opaque(tag, input).map(|_| 0)?,
            };
            n += inner;
        }
        Ok(())
    }

    fn open_container(&mut self, shape: Shape, needed: usize) -> Step<T> {
        self.open.push(Pending {
            shape,
            start: self.values.len(),
            needed,
        });
        Step::Opened
    }
}

/// At most 255 characters: one byte each in Latin-1 (and ASCII), up to four in UTF-8.
fn check_atom(utf8: bool, name: &[u8]) -> Result<&[u8], ReadError> {
    let fits = if !utf8 || name.is_ascii() {
        name.len() <= 255
    } else {
        std::str::from_utf8(name).is_ok_and(|s| s.chars().count() <= 255)
    };
    if fits {
        Ok(name)
    } else {
        Err(ReadError::BadAtom)
    }
}

struct Input<'b> {
    bytes: &'b [u8],
    pos: usize,
}

impl<'b> Input<'b> {
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8], ReadError> {
        if n > self.left() {
            return Err(ReadError::Truncated { at: self.pos });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ReadError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ReadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, ReadError> {
        Ok(usize::from(u16::from_be_bytes(self.array()?)))
    }

    fn u32(&mut self) -> Result<usize, ReadError> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    /// A count of things each at least `min_size` bytes long: refuse counts the
    /// remaining input cannot hold, before any allocation sized by them.
    fn count(&self, n: usize, min_size: usize) -> Result<usize, ReadError> {
        if n.saturating_mul(min_size) > self.left() {
            return Err(ReadError::CountTooLarge {
                count: n,
                at: self.pos,
            });
        }
        Ok(n)
    }
}

/// A native record's header (after its tag): `[u32 fields][u8 flags]`, then come its
/// module and name (atoms), its field names (atoms) and its values: the number of
/// terms those are.
fn record_inner_terms(input: &mut Input) -> Result<usize, ReadError> {
    let fields = input.u32()?;
    // Each field is a name (an atom, at least two bytes) and a value (at least one).
    let fields = input.count(fields, 3)?;
    input.u8()?;
    Ok(2 + 2 * fields)
}

/// Advances past one term of a type the builder gets whole, checking only lengths.
fn skip_opaque(tag: u8, input: &mut Input) -> Result<(), ReadError> {
    match tag {
        PID_EXT => skip_node_then(input, 4 + 4 + 1),
        NEW_PID_EXT => skip_node_then(input, 4 + 4 + 4),
        PORT_EXT => skip_node_then(input, 4 + 1),
        NEW_PORT_EXT => skip_node_then(input, 4 + 4),
        V4_PORT_EXT => skip_node_then(input, 8 + 4),
        REFERENCE_EXT => skip_node_then(input, 4 + 1),
        NEW_REFERENCE_EXT | NEWER_REFERENCE_EXT => {
            let words = input.u16()?;
            if words > 5 {
                return Err(ReadError::Malformed("reference with too many words"));
            }
            let creation = if tag == NEW_REFERENCE_EXT { 1 } else { 4 };
            skip_node_then(input, creation + 4 * words)
        }
        SMALL_BIG_EXT => {
            let n = usize::from(input.u8()?);
            input.take(1 + n).map(drop)
        }
        LARGE_BIG_EXT => {
            let n = input.u32()?;
            input.take(1usize.saturating_add(n)).map(drop)
        }
        BIT_BINARY_EXT => {
            let len = input.u32()?;
            input.take(1usize.saturating_add(len)).map(drop)
        }
        FLOAT_EXT => input.take(31).map(drop),
        NEW_FUN_EXT => {
            // Size counts itself and everything after it.
            let size = input.u32()?;
            if size < 4 {
                return Err(ReadError::Malformed("fun too short"));
            }
            input.take(size - 4).map(drop)
        }
        EXPORT_EXT => {
            skip_atom(input)?;
            skip_atom(input)?;
            match input.u8()? {
                SMALL_INTEGER_EXT => input.take(1).map(drop),
                _ => Err(ReadError::Malformed("export arity is not a small integer")),
            }
        }
        other => Err(ReadError::UnsupportedTag(other)),
    }
}

fn skip_node_then(input: &mut Input, rest: usize) -> Result<(), ReadError> {
    skip_atom(input)?;
    input.take(rest).map(drop)
}

fn skip_atom(input: &mut Input) -> Result<(), ReadError> {
    let len = match input.u8()? {
        ATOM_EXT | ATOM_UTF8_EXT => input.u16()?,
        SMALL_ATOM_EXT | SMALL_ATOM_UTF8_EXT => usize::from(input.u8()?),
        _ => return Err(ReadError::Malformed("expected an atom")),
    };
    input.take(len).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etf::value::{read_value, Value, ValueBuilder};

    /// `[0, 0, ..., 0]` of `n` small integers: `n` + 2 terms (the list, its nil tail).
    fn list_of_zeros(n: u32) -> Vec<u8> {
        let mut bytes = vec![VERSION, 108];
        bytes.extend(n.to_be_bytes());
        for _ in 0..n {
            bytes.extend([97, 0]);
        }
        bytes.push(106);
        bytes
    }

    /// `#nr:pt{x = 1, y = 2, tag = <<"a">>}` as OTP 29's `term_to_binary/1` writes it.
    const RECORD: [u8; 36] = [
        131, 67, 0, 0, 0, 3, 0, 119, 2, 110, 114, 119, 2, 112, 116, 119, 1, 120, 119, 1, 121, 119, 3, 116,
        97, 103, 97, 1, 97, 2, 109, 0, 0, 0, 1, 97,
    ];

    #[test]
    fn a_native_record_is_handed_over_whole() {
        let value = read_value(&RECORD).expect("a record reads");
        assert_eq!(value, Value::Opaque(RECORD[1..].to_vec()));
        // Inside a tuple, with something after it.
        let mut in_tuple = vec![131, 104, 2];
        in_tuple.extend_from_slice(&RECORD[1..]);
        in_tuple.extend([97, 7]);
        let value = read_value(&in_tuple).expect("a tuple holding a record reads");
        assert_eq!(
            value,
            Value::Tuple(vec![Value::Opaque(RECORD[1..].to_vec()), Value::Int(7)])
        );
    }

    #[test]
    fn a_native_record_is_checked_like_any_term() {
        for cut in 2..RECORD.len() {
            let result = read_value(&RECORD[..cut]);
            assert!(
                matches!(
                    result,
                    Err(ReadError::Truncated { .. } | ReadError::CountTooLarge { .. })
                ),
                "cut at {cut}: {result:?}"
            );
        }
        // A field count the input cannot hold is refused before anything is skipped.
        let mut huge = RECORD.to_vec();
        huge[2..6].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(read_value(&huge), Err(ReadError::CountTooLarge { .. })));
        // A value that is not a term.
        let mut bad = RECORD.to_vec();
        bad[26] = 200;
        assert_eq!(read_value(&bad), Err(ReadError::UnsupportedTag(200)));
    }

    #[test]
    fn what_a_record_holds_counts_against_the_step_limit() {
        // A record whose one value is a list of 1,000 zeros.
        let mut record = vec![131, 67, 0, 0, 0, 1, 0, 119, 1, b'm', 119, 1, b'r', 119, 1, b'f'];
        record.extend_from_slice(&list_of_zeros(1000)[1..]);
        assert!(read_value(&record).is_ok());
        let mut builder = ValueBuilder::default();
        let mut reader = Reader::with_step_limit(500);
        assert_eq!(reader.read(&mut builder, &record), Err(ReadError::NeedsScheduler));
        assert!(Reader::with_step_limit(2000).read(&mut builder, &record).is_ok());
    }

    #[test]
    fn a_step_limit_refuses_larger_terms_and_reads_the_rest() {
        let mut reader = Reader::with_step_limit(12);
        let mut builder = ValueBuilder::default();
        assert!(reader.read(&mut builder, &list_of_zeros(10)).is_ok(), "12 terms");
        assert!(read_value(&list_of_zeros(10)).is_ok());
        let large = reader.read(&mut builder, &list_of_zeros(11));
        assert!(matches!(large, Err(ReadError::NeedsScheduler)), "{large:?}");
        // The same reader goes on reading terms within its limit.
        assert!(reader.read(&mut builder, &list_of_zeros(3)).is_ok());
        assert!(Reader::default()
            .read(&mut builder, &list_of_zeros(100_000))
            .is_ok());
    }
}
