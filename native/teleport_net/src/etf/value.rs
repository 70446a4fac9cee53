//! Terms as plain Rust data, built by `read` without a VM: what the parser's
//! tests, property tests and fuzz targets compare and inspect.

use std::cmp::Ordering;

use super::read::{ReadError, TermBuilder};

/// One term. Lists are kept in one shape (`[a | [b]]` is `[a, b]`, a string is a
/// list of integers), so two encodings of the same term read as equal values.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Int(i32),
    Float(Float),
    Atom(String),
    Nil,
    Binary(Vec<u8>),
    Tuple(Vec<Value>),
    /// At least one item; the tail is never a non-empty list (`Nil` for a proper list).
    List(Vec<Value>, Box<Value>),
    /// In the order read; keys are all different.
    Map(Vec<(Value, Value)>),
    /// A type read whole (pid, port, ref, fun, bignum, ...): its bytes, tag first.
    Opaque(Vec<u8>),
}

impl Drop for Value {
    /// Children move to a stack on the heap before each value drops, so a term nested
    /// a million deep does not recurse. (Comparisons and `Debug` do recurse: keep the
    /// values you compare test-sized.)
    fn drop(&mut self) {
        let mut stack = Vec::new();
        self.move_children(&mut stack);
        while let Some(mut value) = stack.pop() {
            value.move_children(&mut stack);
        }
    }
}

impl Value {
    fn move_children(&mut self, to: &mut Vec<Value>) {
        match self {
            Value::Tuple(items) => to.append(items),
            Value::List(items, tail) => {
                to.append(items);
                to.push(std::mem::replace(&mut **tail, Value::Nil));
            }
            Value::Map(pairs) => {
                for (key, value) in pairs.drain(..) {
                    to.push(key);
                    to.push(value);
                }
            }
            _ => {}
        }
    }
}

/// A float compared bit for bit (the parser never makes NaN), so values have a total order.
#[derive(Clone, Copy, Debug)]
pub struct Float(pub f64);

impl PartialEq for Float {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Float {}

impl PartialOrd for Float {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Float {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Builds `Value`s. Terms are indexes into an arena, as the parser copies terms around.
#[derive(Default)]
pub struct ValueBuilder {
    arena: Vec<Value>,
}

impl ValueBuilder {
    fn add(&mut self, value: Value) -> usize {
        self.arena.push(value);
        self.arena.len() - 1
    }

    /// Moves a term out of the arena; each is taken once, by its container or the caller.
    fn take(&mut self, term: usize) -> Value {
        std::mem::replace(&mut self.arena[term], Value::Nil)
    }

    fn take_all(&mut self, terms: &[usize]) -> Vec<Value> {
        terms.iter().map(|&t| self.take(t)).collect()
    }
}

/// Reads one whole term (version byte first) into a `Value`.
pub fn read_value(bytes: &[u8]) -> Result<Value, ReadError> {
    let mut builder = ValueBuilder::default();
    let term = super::read::read(&mut builder, bytes)?;
    Ok(builder.take(term))
}

impl TermBuilder for ValueBuilder {
    type Term = usize;

    fn int(&mut self, value: i32) -> usize {
        self.add(Value::Int(value))
    }

    fn float(&mut self, value: f64) -> usize {
        self.add(Value::Float(Float(value)))
    }

    fn atom(&mut self, utf8: bool, name: &[u8]) -> Result<usize, ReadError> {
        let name = if utf8 {
            String::from_utf8(name.to_vec()).map_err(|_| ReadError::BadAtom)?
        } else {
            name.iter().map(|&b| char::from(b)).collect()
        };
        Ok(self.add(Value::Atom(name)))
    }

    fn nil(&mut self) -> usize {
        self.add(Value::Nil)
    }

    fn string(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return self.nil();
        }
        let items = bytes.iter().map(|&b| Value::Int(i32::from(b))).collect();
        self.add(Value::List(items, Box::new(Value::Nil)))
    }

    fn binary(&mut self, _offset: usize, bytes: &[u8]) -> usize {
        self.add(Value::Binary(bytes.to_vec()))
    }

    fn tuple(&mut self, elements: &[usize]) -> usize {
        let elements = self.take_all(elements);
        self.add(Value::Tuple(elements))
    }

    fn list(&mut self, items: &[usize], tail: usize) -> usize {
        let mut items = self.take_all(items);
        let mut tail = self.take(tail);
        if items.is_empty() {
            return self.add(tail);
        }
        // `[a | [b]]` is `[a, b]`. (Quadratic for long chains of one-item cells: test data only.)
        if let Value::List(more, rest) = &mut tail {
            items.append(more);
            tail = std::mem::replace(&mut **rest, Value::Nil);
        }
        self.add(Value::List(items, Box::new(tail)))
    }

    fn map(&mut self, flat: &[usize]) -> Result<usize, ReadError> {
        let mut pairs = Vec::with_capacity(flat.len() / 2);
        for kv in flat.chunks_exact(2) {
            pairs.push((self.take(kv[0]), self.take(kv[1])));
        }
        let mut keys: Vec<&Value> = pairs.iter().map(|(k, _)| k).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(ReadError::DuplicateKeys);
        }
        Ok(self.add(Value::Map(pairs)))
    }

    fn opaque(&mut self, bytes: &[u8]) -> Result<usize, ReadError> {
        Ok(self.add(Value::Opaque(bytes.to_vec())))
    }
}
