//! Release engineering: `kiln push|pull|upload|download|manifest|sync|sign|sbom|lint`.
//! Argument parsing and printing only; the work is in `kiln_ship`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kiln_ship::oci;
use kiln_ship::store::Remote;

use super::Outcome;

#[derive(Args)]
pub struct PushArgs {
    /// Files or output directories (every regular file inside, named by its relative path),
    /// then the target `oci://REGISTRY/REPO:TAG`.
    #[arg(required = true, num_args = 2.., value_name = "FILES… oci://REGISTRY/REPO:TAG")]
    args: Vec<String>,
    /// The manifest's artifactType.
    #[arg(long, default_value = oci::ARTIFACT_TYPE_IMAGE)]
    artifact_type: String,
    /// Store the files zstd-compressed (media type `application/vnd.kiln.file.v1+zstd`,
    /// title `NAME.zst`); `kiln pull` restores the original files.
    #[arg(long)]
    zstd: bool,
    /// Attach the artifact as a referrer of this manifest (`oci://…:TAG` or `…@sha256:…`,
    /// same repository).
    #[arg(long, value_name = "REF")]
    subject: Option<String>,
    /// Sign every file with this minisign secret key and attach the signatures as a referrer.
    #[arg(long = "key", value_name = "FILE", alias = "sign")]
    sign: Option<PathBuf>,
    /// Attach this SPDX file as an SBOM referrer.
    #[arg(long, value_name = "FILE")]
    sbom: Option<PathBuf>,
    /// Manifest annotation KEY=VALUE (repeatable).
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    insecure: bool,
    /// Upload blobs larger than this many bytes in PATCH chunks of this size.
    #[arg(long, default_value_t = 64 << 20)]
    chunk_size: u64,
    /// No progress notices on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// `oci://REGISTRY/REPO:TAG` or `…@sha256:…`.
    reference: String,
    /// Output directory.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR",
        required_unless_present = "referrers"
    )]
    output: Option<PathBuf>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    insecure: bool,
    /// Times an interrupted blob download is resumed within this run.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Print the artifact's referrers (signatures, SBOMs) instead of pulling.
    #[arg(long)]
    referrers: bool,
    /// No progress notices on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
pub struct UploadArgs {
    /// Files, then the destination `s3://BUCKET/PREFIX` (each file goes to PREFIX/NAME).
    #[arg(required = true, num_args = 2.., value_name = "FILES… s3://BUCKET/PREFIX")]
    args: Vec<String>,
}

#[derive(Args)]
pub struct DownloadArgs {
    /// `s3://BUCKET/KEY` (or an http(s) URL) with a `.sha256` sidecar beside it.
    source: String,
    /// Where to write the file.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: PathBuf,
}

#[derive(Args)]
pub struct SyncArgs {
    /// The manifest: `s3://…`, `http(s)://…` or a path.
    manifest: String,
    /// The cache directory.
    #[arg(long, value_name = "DIR")]
    cache: PathBuf,
    /// Only these architectures (repeatable; all when absent).
    #[arg(long)]
    arch: Vec<String>,
    /// No progress notices on stderr.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
pub struct SignArgs {
    /// Files to sign; each gets FILE.minisig beside it.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The minisign secret key (password in $KILN_MINISIGN_PASSWORD if encrypted).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
}

#[derive(Args)]
pub struct SbomArgs {
    /// The tree: a directory or a tar (plain or compressed), `-` for stdin.
    tree: PathBuf,
    /// The image name recorded in the document.
    #[arg(long)]
    name: Option<String>,
    /// The image file whose sha256 the document records.
    #[arg(long, value_name = "FILE", conflicts_with = "image_sha256")]
    image: Option<PathBuf>,
    /// The image's sha256 (hex), when the image is elsewhere.
    #[arg(long, value_name = "HEX")]
    image_sha256: Option<String>,
    /// Write to this file instead of stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
}

#[derive(Args)]
pub struct LintArgs {
    /// The tree: a directory or a tar (plain or compressed), `-` for stdin.
    tree: PathBuf,
    /// A TOML file with a `[policy]` table (a kiln spec will do) or a top-level `forbid`.
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
}

#[derive(Subcommand)]
pub enum ManifestCommand {
    /// Describe build outputs as a slice of a release manifest, merged into a baseline.
    #[command(after_help = "Examples:
  kiln manifest emit out/hello --release 1.0 --init -o manifest.json
  kiln manifest emit x86_64=out/amd64 aarch64=out/arm64 --release 1.1 --merge-from manifest.json -o manifest.json")]
    Emit(EmitArgs),
}

#[derive(Args)]
pub struct EmitArgs {
    /// Output directories, as `ARCH=DIR` or `DIR` (this machine's architecture).
    #[arg(required = true)]
    outdirs: Vec<String>,
    /// The slice these outputs form.
    #[arg(long, default_value = "default")]
    slice: String,
    /// The release version recorded for each artifact.
    #[arg(long = "release", value_name = "VERSION")]
    release: String,
    /// Object key template: {slice} {version} {arch} {name}.
    #[arg(long, default_value = kiln_ship::manifest::DEFAULT_KEY)]
    key: String,
    /// The current manifest (file, s3:// or http(s)://); every other slice is kept.
    #[arg(long, value_name = "URL_OR_FILE")]
    merge_from: Option<String>,
    /// This is the first manifest: allow writing without a baseline.
    #[arg(long)]
    init: bool,
    /// Write the manifest here.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Publish to this object store key with a conditional put (merging into what is there).
    #[arg(long, value_name = "s3://BUCKET/KEY")]
    publish: Option<String>,
    /// No progress notices on stderr.
    #[arg(short, long)]
    quiet: bool,
}

fn expand_inputs(paths: &[String]) -> anyhow::Result<Vec<oci::PushFile>> {
    let mut out = Vec::new();
    for p in paths {
        let p = PathBuf::from(p);
        let md = std::fs::metadata(&p).with_context(|| format!("{}: stat", p.display()))?;
        if md.is_dir() {
            for (title, path) in kiln_ship::manifest::files_under(&p, &|_| false)? {
                out.push(oci::PushFile { path, title });
            }
        } else {
            let title = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("{}: no file name", p.display()))?;
            out.push(oci::PushFile { path: p, title });
        }
    }
    Ok(out)
}

pub fn push(a: PushArgs) -> Outcome {
    let (target, inputs) = a.args.split_last().context("no target given")?;
    let reference = oci::Reference::parse(target)?;
    let files = expand_inputs(inputs)?;
    if files.is_empty() {
        bail!("nothing to push: no regular files in {inputs:?}");
    }
    let mut annotations = BTreeMap::new();
    for kv in &a.annotations {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("annotation {kv:?}: expected KEY=VALUE"))?;
        annotations.insert(k.to_string(), v.to_string());
    }
    let opts = oci::Options {
        insecure: a.insecure,
        chunk_size: a.chunk_size,
        ..Default::default()
    };
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        let client = oci::Client::new(&reference, opts)?.with_progress(std::sync::Arc::new(
            crate::progress::Renderer::new("kiln push", a.quiet),
        ));
        let subject = match &a.subject {
            Some(s) => {
                let r = oci::Reference::parse(s)?;
                if (r.registry.as_str(), r.repository.as_str())
                    != (reference.registry.as_str(), reference.repository.as_str())
                {
                    bail!("--subject {s}: referrers live in the same repository as their subject");
                }
                Some(oci::resolve(&client, &r).await?.1)
            }
            None => None,
        };
        let pushed = oci::push(
            &client,
            &reference,
            &files,
            &oci::PushOptions {
                artifact_type: a.artifact_type.clone(),
                zstd: a.zstd,
                subject,
                annotations,
            },
        )
        .await?;
        println!("{}@{}", reference_without_digest(&reference), pushed.digest);
        let subject = oci::Descriptor {
            media_type: oci::MT_MANIFEST.into(),
            digest: pushed.digest.clone(),
            size: pushed.size,
            artifact_type: Some(a.artifact_type.clone()),
            annotations: None,
        };
        let by_digest = oci::Reference {
            tag: None,
            digest: None,
            ..reference.clone()
        };
        if let Some(key) = &a.sign {
            let dir = tempfile::tempdir().context("temp dir for signatures")?;
            let k = kiln_ship::sign::SigningKey::load(key)?;
            let mut sigs = Vec::new();
            for f in &files {
                let name = format!("{}.minisig", f.title.replace('/', "_"));
                let p = dir.path().join(&name);
                std::fs::write(&p, k.sign_file(&f.path)?)
                    .with_context(|| format!("{}: write", p.display()))?;
                sigs.push(oci::PushFile {
                    path: p,
                    title: format!("{}.minisig", f.title),
                });
            }
            let r = oci::push(
                &client,
                &by_digest,
                &sigs,
                &oci::PushOptions {
                    artifact_type: oci::ARTIFACT_TYPE_SIGNATURE.into(),
                    zstd: false,
                    subject: Some(subject.clone()),
                    annotations: BTreeMap::new(),
                },
            )
            .await
            .context("attaching signatures")?;
            println!(
                "signatures: {}@{}",
                reference_without_digest(&reference),
                r.digest
            );
        }
        if let Some(sbom) = &a.sbom {
            let title = sbom
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sbom.spdx.json".into());
            let r = oci::push(
                &client,
                &by_digest,
                &[oci::PushFile {
                    path: sbom.clone(),
                    title,
                }],
                &oci::PushOptions {
                    artifact_type: oci::ARTIFACT_TYPE_SBOM.into(),
                    zstd: false,
                    subject: Some(subject),
                    annotations: BTreeMap::new(),
                },
            )
            .await
            .context("attaching the SBOM")?;
            println!(
                "sbom: {}@{}",
                reference_without_digest(&reference),
                r.digest
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn reference_without_digest(r: &oci::Reference) -> String {
    format!("oci://{}/{}", r.registry, r.repository)
}

pub fn pull(a: PullArgs) -> Outcome {
    let reference = oci::Reference::parse(&a.reference)?;
    let opts = oci::Options {
        insecure: a.insecure,
        retries: a.retries,
        ..Default::default()
    };
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        let client = oci::Client::new(&reference, opts)?.with_progress(std::sync::Arc::new(
            crate::progress::Renderer::new("kiln pull", a.quiet),
        ));
        if a.referrers {
            let (_, desc) = oci::resolve(&client, &reference).await?;
            for d in client.referrers(&desc.digest).await? {
                println!(
                    "{} {} {}",
                    d.digest,
                    d.artifact_type.as_deref().unwrap_or("-"),
                    d.size
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        let Some(output) = &a.output else {
            bail!("no output directory: give -o DIR");
        };
        for p in oci::pull(&client, &reference, output).await? {
            println!("{}  {}", p.sha256, p.path.display());
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn upload(a: UploadArgs) -> Outcome {
    let (target, files) = a.args.split_last().context("no destination given")?;
    let (bucket, prefix) = kiln_ship::store::parse_s3(target)?;
    let store = kiln_ship::store::s3_store(&bucket)?;
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        for f in files {
            let path = PathBuf::from(f);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("{f}: no file name"))?;
            let key = if prefix.is_empty() {
                name
            } else {
                format!("{}/{name}", prefix.trim_end_matches('/'))
            };
            let dest = Remote::S3 {
                store: store.clone(),
                bucket: bucket.clone(),
                key,
            };
            let (hex, size) = kiln_ship::store::upload_with_sidecar(&path, &dest).await?;
            println!("{hex}  {dest} ({size} bytes)");
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn download(a: DownloadArgs) -> Outcome {
    let src = Remote::parse(&a.source)?;
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        let (hex, size) = kiln_ship::store::download_with_sidecar(&src, &a.output).await?;
        println!(
            "{hex}  {} ({size} bytes, verified against {src}.sha256)",
            a.output.display()
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn manifest(c: ManifestCommand) -> Outcome {
    let ManifestCommand::Emit(a) = c;
    use kiln_ship::manifest as m;
    let dirs: Vec<m::OutDir> = a.outdirs.iter().map(|s| m::OutDir::parse(s)).collect();
    let slice = m::slice_from_dirs(&dirs, &a.slice, &a.release, &a.key)?;
    if a.output.is_none() && a.publish.is_none() {
        bail!("nowhere to write the manifest: give -o FILE and/or --publish s3://…");
    }
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        let merged = match &a.publish {
            Some(dest) => {
                if a.merge_from.as_deref().is_some_and(|f| f != dest) {
                    bail!("--publish merges into the manifest it publishes to; --merge-from must be absent or the same");
                }
                let dest = Remote::parse(dest)?;
                let progress = crate::progress::Renderer::new("kiln manifest", a.quiet);
                let out = m::publish_slice(&dest, &a.slice, &slice, a.init, &progress).await?;
                eprintln!("published slice {:?} to {dest}", a.slice);
                out
            }
            None => {
                let base = match &a.merge_from {
                    Some(src) => {
                        let r = Remote::parse(src)?;
                        Some(m::read(&r).await?.with_context(|| format!("{r}: baseline manifest not found"))?)
                    }
                    None => None,
                };
                m::merge(base, &a.slice, slice, a.init)?
            }
        };
        if let Some(out) = &a.output {
            if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("{}: create", parent.display()))?;
            }
            let f = kiln_tree::output::AtomicFile::create(out).with_context(|| format!("{}: create", out.display()))?;
            f.file().write_all(&merged.to_bytes()).with_context(|| format!("{}: write", out.display()))?;
            f.commit().with_context(|| format!("{}: commit", out.display()))?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn sync(a: SyncArgs) -> Outcome {
    let url = Remote::parse(&a.manifest)?;
    let rt = kiln_ship::runtime()?;
    rt.block_on(async {
        let progress = crate::progress::Renderer::new("kiln sync", a.quiet);
        let out = kiln_ship::sync::sync(&url, &a.cache, &a.arch, &progress).await?;
        println!(
            "{} downloaded, {} failed, {} up to date",
            out.downloaded.len(),
            out.failed.len(),
            out.plan.len() - out.downloaded.len() - out.failed.len()
        );
        if out.failed.is_empty() {
            Ok(ExitCode::SUCCESS)
        } else {
            for (k, e) in &out.failed {
                eprintln!("kiln: error: {k}: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    })
}

pub fn sign(a: SignArgs) -> Outcome {
    for s in kiln_ship::sign::sign_files(&a.files, &a.key)? {
        println!("{}", s.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn sbom(a: SbomArgs) -> Outcome {
    let arg = kiln_tree::SourceArg::parse(&a.tree);
    let (tree, contents) = kiln_ship::spool::open(&arg)?;
    let sha = match (&a.image, &a.image_sha256) {
        (Some(img), _) => Some(kiln_ship::digest::sha256_file(img)?.0),
        (None, Some(h)) => Some(h.to_ascii_lowercase()),
        (None, None) => None,
    };
    let name = a.name.clone().unwrap_or_else(|| {
        a.image
            .as_ref()
            .unwrap_or(&a.tree)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into())
    });
    let doc = kiln_ship::sbom::spdx_for_tree(&tree, &contents, &name, sha.as_deref())?;
    let mut text = serde_json::to_vec_pretty(&doc)?;
    text.push(b'\n');
    match &a.output {
        Some(out) => {
            let f = kiln_tree::output::AtomicFile::create(out)
                .with_context(|| format!("{}: create", out.display()))?;
            f.file()
                .write_all(&text)
                .with_context(|| format!("{}: write", out.display()))?;
            f.commit()
                .with_context(|| format!("{}: commit", out.display()))?;
        }
        None => std::io::stdout().write_all(&text).context("stdout")?,
    }
    Ok(ExitCode::SUCCESS)
}

pub fn lint(a: LintArgs) -> Outcome {
    let policy = kiln_ship::policy::Policy::load(&a.policy)?;
    let arg = kiln_tree::SourceArg::parse(&a.tree);
    let (tree, contents) = kiln_ship::spool::open(&arg)?;
    let hits = kiln_ship::policy::scan(&tree, &contents, &policy)?;
    for h in &hits {
        println!("{h}");
    }
    if hits.is_empty() {
        eprintln!(
            "{}: no forbidden patterns ({} checked)",
            a.tree.display(),
            policy.forbid.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "kiln: error: {} policy violation(s) in {}",
            hits.len(),
            a.tree.display()
        );
        Ok(ExitCode::FAILURE)
    }
}
