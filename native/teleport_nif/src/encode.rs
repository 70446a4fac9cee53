//! Message bodies on the send side. For now the Erlang side encodes with
//! `erlang:term_to_iovec/1` (yielding, large binaries by reference) and hands us
//! the list of binaries; we pin them with `enif_inspect_iovec` so the writer
//! thread can `writev` them in place. Swapping in a Rust encoder touches this file.

use std::io::IoSlice;
use std::os::raw::c_int;
use std::ptr;

use rustler::sys::{enif_free_iovec, enif_inspect_iovec, ErlNifIOVec};
use rustler::{Env, Term};
use teleport_net::FrameBody;

/// The public head of `ErlNifIOVec` (erl_nif.h); rustler keeps its fields private.
#[repr(C)]
struct IoVecHead {
    iovcnt: c_int,
    size: usize,
    iov: *const libc_iovec,
}

/// `SysIOVec` on unix is `struct iovec`.
#[repr(C)]
struct libc_iovec {
    base: *const u8,
    len: usize,
}

/// An Erlang list of binaries, pinned: the VM keeps the referenced binaries
/// alive until `enif_free_iovec`, which runs when the frame has been written.
pub struct IoVecBody {
    iovec: *mut ErlNifIOVec,
    len: usize,
}

// The iovec is owned by this value alone; erl_nif allows freeing it from any thread.
unsafe impl Send for IoVecBody {}

impl IoVecBody {
    /// `None` unless `list` is a proper list of binaries.
    pub fn from_term(env: Env, list: Term) -> Option<IoVecBody> {
        let mut iovec: *mut ErlNifIOVec = ptr::null_mut();
        let mut tail = list.as_c_arg();
        // A NULL env makes the iovec independent of the calling process: small binaries
        // are copied, refc binaries are referenced, and all of it lives until freed.
        let ok = unsafe {
            enif_inspect_iovec(
                ptr::null_mut(),
                usize::MAX,
                list.as_c_arg(),
                &mut tail,
                &mut iovec,
            )
        };
        if ok == 0 || iovec.is_null() {
            return None;
        }
        let body = IoVecBody {
            iovec,
            len: unsafe { (*(iovec as *const IoVecHead)).size },
        };
        // With no element limit the whole list is consumed; anything else is not a list of binaries.
        let rest = unsafe { Term::new(env, tail) };
        if !rest.is_empty_list() {
            return None;
        }
        Some(body)
    }
}

impl FrameBody for IoVecBody {
    fn len(&self) -> usize {
        self.len
    }

    fn push_chunks<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        // SAFETY: `iov` holds `iovcnt` entries pointing at bytes the iovec pins until it
        // is freed in `drop`, which cannot happen while `&self` is borrowed.
        unsafe {
            let head = &*(self.iovec as *const IoVecHead);
            for i in 0..head.iovcnt.max(0) as usize {
                let entry = &*head.iov.add(i);
                if entry.len > 0 {
                    out.push(IoSlice::new(std::slice::from_raw_parts(entry.base, entry.len)));
                }
            }
        }
    }
}

impl Drop for IoVecBody {
    fn drop(&mut self) {
        unsafe { enif_free_iovec(self.iovec) };
    }
}
