//! Durable git writes. libgit2 fsyncs loose objects, packs and refs only when told: through the
//! config key `core.fsyncObjectFiles`, which git itself has deprecated (plain git warns about it
//! on every command), or through a process-wide option git2 does not expose. coin turns that
//! option on here, once, before it opens a repository, and sets git's current key
//! (`core.fsync`) in the repository for plain git.
//!
//! The one `unsafe` call of the crate: a plain C setter with an int argument, no pointers.

use std::sync::Once;

/// Make every libgit2 write of this process (objects, packs, refs) fsynced before it counts
/// as done. Idempotent.
#[allow(unsafe_code)]
pub(crate) fn enable() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        libgit2_sys::init();
        // SAFETY: git_libgit2_opts with GIT_OPT_ENABLE_FSYNC_GITDIR takes one int and sets a
        // global flag; libgit2 is initialised above, and the call happens before any
        // repository is opened by this process through `history` (it runs under a Once).
        let rc = unsafe {
            libgit2_sys::git_libgit2_opts(
                libgit2_sys::GIT_OPT_ENABLE_FSYNC_GITDIR as std::ffi::c_int,
                1 as std::ffi::c_int,
            )
        };
        debug_assert_eq!(rc, 0, "libgit2 refused GIT_OPT_ENABLE_FSYNC_GITDIR");
    });
}
