//! minisign signatures (Ed25519 over the BLAKE2b-512 prehash of the file, the "ED" algorithm),
//! written as `FILE.minisig` beside each file so that `minisign -Vm FILE -p KEY.pub` verifies
//! them. Format: <https://jedisct1.github.io/minisign/>.
//!
//! The trusted comment is `file:<name>` plus the `SOURCE_DATE_EPOCH` timestamp when set, never
//! the wall clock. (The signature bytes themselves still differ between runs: the minisign
//! crate adds random noise to each Ed25519 signature. Every one of them verifies.)

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

/// Environment variable holding the secret key's password; unset means an unencrypted key
/// (`minisign -G -W`).
pub const PASSWORD_ENV: &str = "KILN_MINISIGN_PASSWORD";

/// A loaded secret key and its public half (when the `.pub` file sits beside it).
pub struct SigningKey {
    sk: SecretKey,
    pk: Option<PublicKey>,
}

impl SigningKey {
    /// Loads a minisign secret key file. The password comes from [`PASSWORD_ENV`] (empty
    /// when unset); a wrong password is an error, never a prompt. A public key at
    /// `KEY.pub` or at `KEY` with `.key` replaced by `.pub` is used to self-check signatures.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let password = std::env::var(PASSWORD_ENV).unwrap_or_default();
        let sk = load_secret_key(path, &password)
            .map_err(|e| anyhow::anyhow!("{e:#}; an encrypted key needs ${PASSWORD_ENV}"))?;
        let pk = PublicKey::from_secret_key(&sk).ok();
        Ok(Self { sk, pk })
    }

    /// Signs one file, returning the signature box text (`.minisig` contents).
    pub fn sign_file(&self, path: &Path) -> anyhow::Result<String> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let trusted = trusted_comment(&name)?;
        let f = File::open(path).with_context(|| format!("{}: open", path.display()))?;
        let sig = minisign::sign(
            self.pk.as_ref(),
            &self.sk,
            std::io::BufReader::with_capacity(crate::digest::BUF, f),
            Some(&trusted),
            Some("signature from kiln"),
        )
        .map_err(|e| anyhow::anyhow!("{}: signing: {e}", path.display()))?;
        Ok(sig.into_string())
    }
}

/// Loads the minisign secret key file `path`: a key written without a password (see
/// [`unencrypted_key`]), else an encrypted one opened with `password`. The one parser of
/// secret keys: `kiln build --key`, `kiln sign` and `kiln serve`'s signing use it.
pub fn load_secret_key(path: &Path, password: &str) -> anyhow::Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: reading minisign secret key", path.display()))?;
    if let Some(sk) = unencrypted_key(&text, path)? {
        return Ok(sk);
    }
    SecretKeyBox::from_string(&text)
        .and_then(|b| b.into_secret_key(Some(password.to_string())))
        .map_err(|e| anyhow::anyhow!("{}: not a usable minisign secret key ({e})", path.display()))
}

/// Loads a key written without a password (`minisign -G -W`): KDF algorithm `0x0000`. The
/// minisign CLI (0.11) stores an all-zero checksum in such keys, which the minisign crate's
/// loader rejects as a wrong password, so kiln reads the fields itself. Layout (minisign's
/// key format): sig_alg(2) kdf_alg(2) chk_alg(2) salt(32) opslimit(8) memlimit(8) keynum(8)
/// secret key(64) checksum(32) = 158 bytes.
fn unencrypted_key(text: &str, path: &Path) -> anyhow::Result<Option<SecretKey>> {
    use base64::Engine;
    let Some(line) = text.lines().nth(1) else {
        return Ok(None);
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(line.trim()) else {
        return Ok(None);
    };
    if raw.len() != 158 || raw.get(2..4) != Some(&[0, 0][..]) {
        return Ok(None);
    }
    if raw.get(0..2) != Some(&b"Ed"[..]) {
        anyhow::bail!(
            "{}: unsupported signature algorithm in secret key",
            path.display()
        );
    }
    // The checksum is either zero (minisign CLI) or BLAKE2b-256(sig_alg || keynum || sk).
    let chk = &raw[126..158];
    if chk.iter().any(|&b| b != 0) {
        use blake2::digest::{Update, VariableOutput};
        let mut h = blake2::Blake2bVar::new(32).map_err(|e| anyhow::anyhow!("blake2b: {e}"))?;
        h.update(&raw[0..2]);
        h.update(&raw[54..126]);
        let mut want = [0u8; 32];
        h.finalize_variable(&mut want)
            .map_err(|e| anyhow::anyhow!("blake2b: {e}"))?;
        if want != chk {
            anyhow::bail!(
                "{}: secret key checksum does not match (corrupted key file)",
                path.display()
            );
        }
    }
    SecretKey::from_bytes(&raw)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: not a minisign secret key: {e}", path.display()))
}

fn trusted_comment(name: &str) -> anyhow::Result<String> {
    // Names go in a single-line comment: drop anything that could break the line.
    let clean: String = name.chars().filter(|c| !c.is_control()).collect();
    Ok(match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(_) => format!(
            "timestamp:{}\tfile:{clean}",
            crate::time::source_date_epoch()?
        ),
        Err(_) => format!("file:{clean}"),
    })
}

/// The signature path for a file: `FILE.minisig`.
pub fn sig_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

/// Signs each file with the minisign secret key at `key`, writing `FILE.minisig` beside it
/// (atomically). Returns the signature paths in the order of `files`. This is what
/// `kiln sign` and `kiln build --sign` call.
pub fn sign_files(files: &[PathBuf], key: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let key = SigningKey::load(key)?;
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let text = key.sign_file(f)?;
        let dest = sig_path(f);
        let a = kiln_tree::output::AtomicFile::create(&dest)
            .with_context(|| format!("{}: create", dest.display()))?;
        a.file()
            .write_all(text.as_bytes())
            .with_context(|| format!("{}: write", a.tmp_path().display()))?;
        a.commit()
            .with_context(|| format!("{}: commit", dest.display()))?;
        out.push(dest);
    }
    Ok(out)
}

/// What a successful verification found.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The signature's trusted comment (signed together with the file).
    pub trusted_comment: String,
}

/// Loads a minisign public key from a file (`minisign -G` output) or a bare base64 string.
pub fn load_public_key(pubkey: &Path) -> anyhow::Result<PublicKey> {
    let text = std::fs::read_to_string(pubkey)
        .with_context(|| format!("{}: reading minisign public key", pubkey.display()))?;
    let parsed = if text.lines().count() >= 2 {
        PublicKeyBox::from_string(&text).and_then(|b| b.into_public_key())
    } else {
        PublicKey::from_base64(text.trim())
    };
    parsed.map_err(|e| anyhow::anyhow!("{}: not a minisign public key: {e}", pubkey.display()))
}

/// Verifies `file` against its signature (`sig`, or `FILE.minisig` when `None`) with the
/// public key file `pubkey`. Only prehashed ("ED") signatures are accepted, as `minisign -V`
/// does by default. A bad signature is [`crate::Error::BadSignature`].
pub fn verify_file(file: &Path, pubkey: &Path, sig: Option<&Path>) -> anyhow::Result<Verified> {
    let pk = load_public_key(pubkey)?;
    let sig_file = sig.map(Path::to_path_buf).unwrap_or_else(|| sig_path(file));
    let sbox = SignatureBox::from_file(&sig_file)
        .map_err(|e| anyhow::anyhow!("{}: not a minisign signature: {e}", sig_file.display()))?;
    let f = File::open(file).with_context(|| format!("{}: open", file.display()))?;
    minisign::verify(
        &pk,
        &sbox,
        std::io::BufReader::with_capacity(crate::digest::BUF, f),
        true,
        false,
        false,
    )
    .map_err(|e| crate::Error::BadSignature {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    let trusted_comment = sbox
        .trusted_comment()
        .map_err(|e| anyhow::anyhow!("{}: trusted comment: {e}", sig_file.display()))?;
    Ok(Verified { trusted_comment })
}

/// Verifies `bytes` (a file fetched into memory, named `what` in errors) against the text of
/// its `.minisig` with the public key file `pubkey`; the same checks as [`verify_file`].
pub fn verify_bytes(
    bytes: &[u8],
    sig_text: &str,
    pubkey: &Path,
    what: &str,
) -> anyhow::Result<Verified> {
    let pk = load_public_key(pubkey)?;
    let sbox = SignatureBox::from_string(sig_text)
        .map_err(|e| anyhow::anyhow!("{what}.minisig: not a minisign signature: {e}"))?;
    minisign::verify(&pk, &sbox, std::io::Cursor::new(bytes), true, false, false).map_err(|e| {
        crate::Error::BadSignature {
            path: what.to_string(),
            reason: e.to_string(),
        }
    })?;
    let trusted_comment = sbox
        .trusted_comment()
        .map_err(|e| anyhow::anyhow!("{what}.minisig: trusted comment: {e}"))?;
    Ok(Verified { trusted_comment })
}

/// Generates an unencrypted key pair (`KEY` and `KEY.pub`), for tests and first setups.
pub fn generate_unencrypted(secret: &Path, public: &Path) -> anyhow::Result<()> {
    let kp = minisign::KeyPair::generate_unencrypted_keypair()
        .map_err(|e| anyhow::anyhow!("generating a minisign key pair: {e}"))?;
    // Written the way `minisign -G -W` writes it: KDF algorithm 0x0000, zero salt and limits,
    // zero checksum (see [`unencrypted_key`]).
    let mut raw = kp.sk.to_bytes();
    if raw.len() != 158 {
        anyhow::bail!("unexpected minisign secret key length {}", raw.len());
    }
    raw[2..4].fill(0);
    raw[6..54].fill(0);
    raw[126..158].fill(0);
    use base64::Engine;
    let sk_text = format!(
        "untrusted comment: minisign unencrypted secret key (kiln)\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(&raw)
    );
    let pk = kp
        .pk
        .to_box()
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    std::fs::write(secret, sk_text).with_context(|| format!("{}: write", secret.display()))?;
    std::fs::write(public, pk.into_string())
        .with_context(|| format!("{}: write", public.display()))?;
    Ok(())
}
