//! Fuzzes the checkpoint reader end to end: zip index, legacy stream, the
//! restricted pickle machine, tensor materialisation. Any input must give a
//! value or an error, never a panic, a hang or a huge allocation.
//!
//!     cargo +nightly fuzz run pth fuzz/corpus/pth fuzz/seeds -- -max_total_time=600 -rss_limit_mb=1024
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sam_unet::io::pth::read_pth_bytes(data);
    // The bare pickle machine too, for inputs that are not archives.
    let mut m = sam_unet::io::pickle::Machine::new(data, |_| Err(sam_unet::io::pickle::PickleError::Limit("no storages".into())));
    let _ = m.run();
});
