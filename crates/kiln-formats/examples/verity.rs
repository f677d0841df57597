//! Formats a dm-verity hash device over a data file, as `veritysetup format` does; used by
//! `scripts/bench-verity` to compare the two on the same input.
//!
//! Usage: `verity DATA HASH SALT_HEX UUID` — prints the root hash.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;

use kiln_formats::repart;
use kiln_formats::sink::FileSink;
use kiln_formats::verity::{self, Params};

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s == "-" {
        return Some(Vec::new());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [data, hash, salt, uuid] = args.as_slice() else {
        eprintln!("usage: verity DATA HASH SALT_HEX UUID");
        return ExitCode::from(2);
    };
    let (Some(salt), Some(uuid)) = (parse_hex(salt), repart::uuid_from_spec(uuid)) else {
        eprintln!("bad salt (hex) or uuid");
        return ExitCode::from(2);
    };
    let run = || -> Result<String, Box<dyn std::error::Error>> {
        let d = File::open(data).map_err(|e| format!("{data}: {e}"))?;
        let size = d.metadata()?.len();
        let params = Params::new(&salt, uuid);
        let hs = verity::hash_size(size, &params);
        let h = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(hash)
            .map_err(|e| format!("{hash}: {e}"))?;
        h.set_len(hs)?;
        let read = |off: u64, buf: &mut [u8]| d.read_exact_at(buf, off);
        let f = verity::format(&params, size, &read, &FileSink::new(&h, 0, hs))?;
        Ok(f.root_hash_hex())
    };
    match run() {
        Ok(root) => {
            println!("{root}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("verity: {e}");
            ExitCode::FAILURE
        }
    }
}
