//! systemd-sysupdate transfer definitions (sysupdate.d(5); SPECS.md "systemd-sysupdate
//! transfers") that install a build's split artifacts — `NAME_VERSION.root.raw`,
//! `NAME_VERSION.root-verity.raw`, `NAME_VERSION.efi` — into the inactive A/B slots.

/// Where the booted system finds new versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory on the system (`Type=regular-file`).
    Dir(String),
    /// An HTTP(S) URL serving the artifacts and a SHA256SUMS file (`Type=url-file`).
    Url(String),
}

impl Default for Source {
    fn default() -> Self {
        Source::Dir("/var/lib/kiln/updates".into())
    }
}

/// One transfer file: its name (`50-root.transfer`) and text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// File name under `sysupdate.d/`.
    pub file: String,
    /// Contents.
    pub text: String,
}

fn source_section(src: &Source, pattern: &str) -> String {
    let (ty, path) = match src {
        Source::Dir(d) => ("regular-file", d.as_str()),
        Source::Url(u) => ("url-file", u.as_str()),
    };
    format!("[Source]\nType={ty}\nPath={path}\nMatchPattern={pattern}\n")
}

/// The transfers for an image named `name` whose root partition type is `root_type`
/// (`root` or `usr`, DPS names without the architecture suffix), optionally with verity, and,
/// when the image has one (`uki` is `Some(tries)`), a UKI, with boot counting when `tries` > 0.
/// An image without `[boot]` has no `NAME_VERSION.efi` to transfer, and a transfer whose source
/// never matches would make systemd-sysupdate fail.
pub fn transfers(
    name: &str,
    root_type: &str,
    verity: bool,
    uki: Option<u32>,
    src: &Source,
) -> Vec<Transfer> {
    let mut out = Vec::new();
    let mut t = String::from("[Transfer]\nProtectVersion=%A\n\n");
    t += &source_section(src, &format!("{name}_@v.{root_type}.raw"));
    t += &format!(
        "\n[Target]\nType=partition\nPath=auto\nMatchPattern={name}_@v\nMatchPartitionType={root_type}\nReadOnly=1\n"
    );
    out.push(Transfer {
        file: format!("50-{root_type}.transfer"),
        text: t,
    });
    if verity {
        let mut t = String::from("[Transfer]\nProtectVersion=%A\n\n");
        t += &source_section(src, &format!("{name}_@v.{root_type}-verity.raw"));
        t += &format!(
            "\n[Target]\nType=partition\nPath=auto\nMatchPattern={name}_@v\nMatchPartitionType={root_type}-verity\nReadOnly=1\n"
        );
        out.push(Transfer {
            file: format!("60-{root_type}-verity.transfer"),
            text: t,
        });
    }
    let Some(tries) = uki else {
        return out;
    };
    let mut t = String::from("[Transfer]\nProtectVersion=%A\n\n");
    t += &source_section(src, &format!("{name}_@v.efi"));
    t += "\n[Target]\nType=regular-file\nPath=/EFI/Linux\nPathRelativeTo=boot\n";
    if tries > 0 {
        t += &format!(
            "MatchPattern={name}_@v+@l-@d.efi \\\n             {name}_@v+@l.efi \\\n             {name}_@v.efi\nMode=0444\nTriesLeft={tries}\nTriesDone=0\nInstancesMax=2\n"
        );
    } else {
        t += &format!("MatchPattern={name}_@v.efi\nMode=0444\nInstancesMax=2\n");
    }
    out.push(Transfer {
        file: "70-uki.transfer".into(),
        text: t,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_verity_and_uki_transfers() {
        let t = transfers("kiosk", "root", true, Some(3), &Source::default());
        assert_eq!(
            t.iter().map(|t| t.file.as_str()).collect::<Vec<_>>(),
            [
                "50-root.transfer",
                "60-root-verity.transfer",
                "70-uki.transfer"
            ]
        );
        assert!(t[0].text.contains("MatchPattern=kiosk_@v.root.raw\n"));
        assert!(t[0].text.contains("MatchPartitionType=root\n"));
        assert!(t[1].text.contains("MatchPartitionType=root-verity\n"));
        assert!(t[2].text.contains("kiosk_@v+@l-@d.efi"));
        assert!(t[2].text.contains("TriesLeft=3\n"));
        let t = transfers(
            "kiosk",
            "usr",
            false,
            Some(0),
            &Source::Url("https://u.example/kiosk".into()),
        );
        assert_eq!(t.len(), 2);
        assert!(t[0]
            .text
            .contains("Type=url-file\nPath=https://u.example/kiosk\n"));
        assert!(!t[1].text.contains("TriesLeft"));
    }

    #[test]
    fn no_uki_transfer_without_a_uki() {
        let t = transfers("kiosk", "root", true, None, &Source::default());
        assert_eq!(
            t.iter().map(|t| t.file.as_str()).collect::<Vec<_>>(),
            ["50-root.transfer", "60-root-verity.transfer"]
        );
    }
}
