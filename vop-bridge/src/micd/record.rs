//! What micd writes down about a running card, so that a new micd adopts it
//! with the configuration it was booted with (`<card dir>/card.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::CardConfig;

/// One card's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The configuration in effect (including `micctl config` changes).
    pub config: CardConfig,
    /// Boots so far.
    pub boots: u64,
    /// When the current boot started (seconds since the epoch).
    pub booted_at: Option<u64>,
    /// The last shutdown status other than nop.
    pub last_shutdown_status: String,
}

impl Record {
    /// Reads a record; `None` if there is none or it cannot be read.
    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the record (through a temporary file, so it is whole or absent).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("micd-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("card.json");
        assert_eq!(Record::load(&p), None);
        let r = Record {
            config: CardConfig {
                memory: 512,
                cmdline: "x=1".into(),
                ..Default::default()
            },
            boots: 3,
            booted_at: Some(1_700_000_000),
            last_shutdown_status: "restart".into(),
        };
        r.save(&p).unwrap();
        assert_eq!(Record::load(&p), Some(r));
        std::fs::write(&p, "{").unwrap();
        assert_eq!(Record::load(&p), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
