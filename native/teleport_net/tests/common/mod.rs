//! A small external-term-format writer for `Value`s, for the tests and the fuzz
//! targets only (they include this file): what the parser reads back must be what
//! was written. Independent of `etf::write` on purpose, so the parser is not checked
//! against the code it pairs with.

use teleport_net::etf::value::{read_value, Value};
use teleport_net::etf::*;

/// A term read back from its own encoding is the same term. (Each test binary that
/// includes this module uses only some of it.)
#[allow(dead_code)]
pub fn assert_round_trip(value: &Value, what: &str) {
    let bytes = write(value);
    assert_eq!(read_value(&bytes).as_ref(), Ok(value), "{what}: re-read differs");
}

/// `131` and the term. Lists of bytes go out as STRING_EXT, which reads back as
/// the same list.
pub fn write(value: &Value) -> Vec<u8> {
    let mut out = vec![VERSION];
    write_into(value, &mut out);
    out
}

fn write_into(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Int(i) => match u8::try_from(*i) {
            Ok(small) => out.extend([SMALL_INTEGER_EXT, small]),
            Err(_) => {
                out.push(INTEGER_EXT);
                out.extend(i.to_be_bytes());
            }
        },
        Value::Float(f) => {
            out.push(NEW_FLOAT_EXT);
            out.extend(f.0.to_be_bytes());
        }
        Value::Atom(name) => {
            if let Ok(len) = u8::try_from(name.len()) {
                out.extend([SMALL_ATOM_UTF8_EXT, len]);
            } else {
                out.push(ATOM_UTF8_EXT);
                out.extend((name.len() as u16).to_be_bytes());
            }
            out.extend(name.as_bytes());
        }
        Value::Nil => out.push(NIL_EXT),
        Value::Binary(bytes) => {
            out.push(BINARY_EXT);
            out.extend((bytes.len() as u32).to_be_bytes());
            out.extend(bytes);
        }
        Value::Tuple(items) => {
            if let Ok(arity) = u8::try_from(items.len()) {
                out.extend([SMALL_TUPLE_EXT, arity]);
            } else {
                out.push(LARGE_TUPLE_EXT);
                out.extend((items.len() as u32).to_be_bytes());
            }
            items.iter().for_each(|item| write_into(item, out));
        }
        Value::List(items, tail) => {
            if let Some(bytes) = as_string(items, tail) {
                out.push(STRING_EXT);
                out.extend((bytes.len() as u16).to_be_bytes());
                out.extend(bytes);
                return;
            }
            out.push(LIST_EXT);
            out.extend((items.len() as u32).to_be_bytes());
            items.iter().for_each(|item| write_into(item, out));
            write_into(tail, out);
        }
        Value::Map(pairs) => {
            out.push(MAP_EXT);
            out.extend((pairs.len() as u32).to_be_bytes());
            for (key, value) in pairs {
                write_into(key, out);
                write_into(value, out);
            }
        }
        Value::Opaque(bytes) => out.extend(bytes),
    }
}

/// A proper list of at most 65535 integers 0..=255.
fn as_string(items: &[Value], tail: &Value) -> Option<Vec<u8>> {
    if *tail != Value::Nil || items.len() > usize::from(u16::MAX) {
        return None;
    }
    items
        .iter()
        .map(|item| match item {
            Value::Int(i) => u8::try_from(*i).ok(),
            _ => None,
        })
        .collect()
}
