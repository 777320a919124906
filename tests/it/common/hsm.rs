//! A real PKCS#11 token for the key-custody tests: SoftHSM2, initialised by the test in its own
//! folder (`SOFTHSM2_CONF` pointing at a config with its own token directory, given to every
//! process that uses it), keys generated inside the token with OpenSC's `pkcs11-tool`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's SoftHSM2 module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The token label the tests use.
pub const TOKEN: &str = "finhub";
/// The token's user PIN.
pub const PIN: &str = "8642-pin";

/// One initialised token.
pub struct SoftHsm {
    pub conf: PathBuf,
}

impl SoftHsm {
    /// A token labelled [`TOKEN`] with user PIN [`PIN`], in `dir`.
    pub fn new(dir: &Path) -> SoftHsm {
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm { conf };
        hsm.run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                TOKEN,
                "--pin",
                PIN,
                "--so-pin",
                "so-9753",
            ],
        );
        hsm
    }

    /// `(SOFTHSM2_CONF, path)` for the processes that use this token.
    pub fn env(&self) -> (String, String) {
        ("SOFTHSM2_CONF".into(), self.conf.display().to_string())
    }

    /// Generates a key pair in the token (`key_type` as pkcs11-tool takes it: `rsa:2048`,
    /// `EC:prime256v1`) with `label` and `id` (hex); returns its public key (SPKI DER).
    pub fn keypair(&self, key_type: &str, label: &str, id: &str) -> Vec<u8> {
        self.tool(&[
            "--login",
            "--pin",
            PIN,
            "--keypairgen",
            "--key-type",
            key_type,
            "--label",
            label,
            "--id",
            id,
        ]);
        let out = self.conf.with_file_name(format!("{label}.spki.der"));
        self.tool(&[
            "--read-object",
            "--type",
            "pubkey",
            "--label",
            label,
            "-o",
            out.to_str().unwrap(),
        ]);
        std::fs::read(out).unwrap()
    }

    fn tool(&self, args: &[&str]) {
        let mut all = vec!["--module", SOFTHSM_MODULE, "--token-label", TOKEN];
        all.extend_from_slice(args);
        self.run("pkcs11-tool", &all);
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap_or_else(|e| panic!("{program} (apt-get install softhsm2 opensc): {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
