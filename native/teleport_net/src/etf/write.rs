//! Byte-level writer of the external term format (to be filled: see etf/mod.rs).
