//! The causal-LM tokenizer and chat templates against transformers, on expected values written by
//! `fixtures/make_tokenizer_fixtures.py` (transformers 5.25, tokenizers 0.23, jinja2 3.1):
//!
//! * SmolLM2-135M-Instruct's tokenizer built from its GGUF metadata gives HF's ids for every
//!   corpus line (ASCII, whitespace runs, accents, CJK, emoji, code, digit runs, special tokens
//!   written in text), also under other `tokenizer.ggml.pre` values, decodes as HF does, and
//!   streams decoded text without broken characters;
//! * its chat template renders (and tokenizes) byte for byte as `apply_chat_template`, and extra
//!   templates using Python string methods, `namespace`, loop controls, `raise_exception` and
//!   `tojson` render as transformers renders them;
//! * a small tokenizer folder saved by transformers' `save_pretrained` loads from
//!   `tokenizer.json` + `tokenizer_config.json` + `chat_template.jinja`;
//! * broken metadata, unknown pre-tokenizers and ids outside the vocabulary are typed errors.
//!
//! The SmolLM2 GGUF file is required (`python3 scripts/fetch_smollm2.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use peft_models::ModelError;
use peft_models::chat::{ChatMessage, ChatTemplate};
use peft_models::gguf::{GgufFile, GgufValue};
use peft_models::tokenizer::{ModelTokenizer, SUPPORTED_PRE_TOKENIZERS};
use serde_json::Value as Json;

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/tokenizer")
        .join(path)
}

fn load_json(path: &str) -> Json {
    let file = fixture(path);
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn ids(value: &Json) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| u32::try_from(v.as_u64().expect("an id")).expect("a u32 id"))
        .collect()
}

fn text(value: &Json) -> &str {
    value.as_str().expect("a string")
}

/// SmolLM2's GGUF metadata (read once per test binary). Fails with the fetch hint when the file
/// is missing.
fn smollm2_metadata() -> &'static BTreeMap<String, GgufValue> {
    static METADATA: OnceLock<BTreeMap<String, GgufValue>> = OnceLock::new();
    METADATA.get_or_init(|| {
        let path = peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"));
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        file.metadata().clone()
    })
}

fn smollm2() -> &'static ModelTokenizer {
    static TOKENIZER: OnceLock<ModelTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        ModelTokenizer::from_gguf_metadata(smollm2_metadata(), "SmolLM2-135M-Instruct.gguf")
            .unwrap_or_else(|e| panic!("{e}"))
    })
}

fn expected() -> &'static Json {
    static EXPECTED: OnceLock<Json> = OnceLock::new();
    EXPECTED.get_or_init(|| load_json("smollm2.json"))
}

fn corpus() -> &'static [Json] {
    expected()["encode"].as_array().expect("encode entries")
}

fn conversations() -> BTreeMap<String, Vec<ChatMessage>> {
    let convs = load_json("conversations.json");
    convs
        .as_array()
        .expect("conversations")
        .iter()
        .map(|c| {
            let messages = serde_json::from_value(c["messages"].clone()).expect("messages");
            (text(&c["name"]).to_string(), messages)
        })
        .collect()
}

/// Decodes `ids` one at a time through the stream decoder: the printed pieces, and how many
/// steps held their text back.
fn stream(tokenizer: &ModelTokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, usize) {
    let mut decoder = tokenizer.stream_decoder(skip_special);
    let mut pieces = Vec::new();
    let mut held = 0;
    for &id in ids {
        match decoder.step(id).expect("step") {
            Some(piece) => pieces.push(piece),
            None => held += 1,
        }
    }
    pieces.extend(decoder.flush().expect("flush"));
    (pieces, held)
}

fn tokenizer_message(result: Result<impl std::fmt::Debug, ModelError>) -> String {
    match result {
        Err(ModelError::Tokenizer {
            source_name,
            message,
        }) => {
            assert!(!source_name.is_empty(), "the error names its source");
            message
        }
        other => panic!("expected ModelError::Tokenizer, got {other:?}"),
    }
}

#[test]
fn smollm2_special_tokens_match_transformers() {
    let tok = smollm2();
    let exp = expected();
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    for (ours, key) in [
        (tok.bos_token_id(), "bos_token_id"),
        (tok.eos_token_id(), "eos_token_id"),
        (tok.pad_token_id(), "pad_token_id"),
        (tok.unk_token_id(), "unk_token_id"),
    ] {
        assert_eq!(ours.map(u64::from), exp[key].as_u64(), "{key}");
    }
    assert_eq!(tok.add_bos_token(), exp["add_bos_token"].as_bool().unwrap());
    assert_eq!(tok.add_eos_token(), exp["add_eos_token"].as_bool().unwrap());
    assert_eq!(
        tok.bos_token().as_deref(),
        exp["special_tokens_map"]["bos_token"].as_str()
    );
    assert_eq!(
        tok.eos_token().as_deref(),
        exp["special_tokens_map"]["eos_token"].as_str()
    );
    assert_eq!(tok.chat_template_source(), exp["chat_template"].as_str());
    // HF's special ids are special here (skipped by decode); the other control tokens are too.
    for id in ids(&exp["all_special_ids"]) {
        assert!(tok.is_special(id), "id {id} is special");
    }
    assert!(tok.is_special(5), "<file_sep> (control) is special");
    assert!(!tok.is_special(100), "an ordinary token is not special");

    // Straight from the file: the same tokenizer, named after the file.
    let path = peft_models::smollm2_path().unwrap_or_else(|e| panic!("{e}"));
    let from_file = ModelTokenizer::from_gguf(&path).unwrap();
    assert_eq!(from_file.source_name(), path.display().to_string());
    let line = text(&corpus()[1]["text"]);
    assert_eq!(
        from_file.encode(line, false).unwrap(),
        tok.encode(line, false).unwrap()
    );
    let missing = path.with_extension("missing.gguf");
    assert!(matches!(
        ModelTokenizer::from_gguf(&missing),
        Err(ModelError::Gguf(_))
    ));
}

#[test]
fn smollm2_encode_matches_transformers_on_the_corpus() {
    let tok = smollm2();
    let mut differing = Vec::new();
    for entry in corpus() {
        let line = text(&entry["text"]);
        assert_eq!(
            tok.encode(line, false).unwrap(),
            ids(&entry["ids"]),
            "{line:?}"
        );
        assert_eq!(
            tok.encode(line, true).unwrap(),
            ids(&entry["ids_with_special"]),
            "{line:?} with special tokens"
        );
        let tokens: Vec<String> = ids(&entry["ids"])
            .iter()
            .map(|&id| tok.id_to_token(id).unwrap())
            .collect();
        let expected_tokens: Vec<&str> = entry["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(text)
            .collect();
        assert_eq!(tokens, expected_tokens, "{line:?}");
        if let Some(hf) = entry.get("transformers_gguf_ids") {
            assert_ne!(ids(hf), ids(&entry["ids"]));
            differing.push(line);
        }
    }
    // Only the line with non-ASCII numbers after spaces splits differently in transformers'
    // GGUF loader (no digit split for `smollm`); every other line is its exact output.
    assert_eq!(differing, ["x² + ½ = ³⁄₄ and ٣٤ ١٢ and Ⅻ"]);
    // Special tokens written in text are matched whole.
    assert_eq!(tok.encode("<|im_start|><|im_end|>", false).unwrap(), [1, 2]);
}

#[test]
fn other_pre_tokenizers_match_transformers_gguf_converter() {
    let first = &corpus()[0]["pre"];
    let pres: Vec<&String> = first.as_object().unwrap().keys().collect();
    assert!(pres.len() >= 4, "{pres:?}");
    for pre in pres {
        let mut metadata = smollm2_metadata().clone();
        metadata.insert("tokenizer.ggml.pre".into(), GgufValue::String(pre.clone()));
        let tok = ModelTokenizer::from_gguf_metadata(&metadata, format!("SmolLM2 with pre {pre}"))
            .unwrap();
        let mut differs_from_smollm = false;
        for entry in corpus() {
            let line = text(&entry["text"]);
            let expected = ids(&entry["pre"][pre.as_str()]);
            assert_eq!(
                tok.encode(line, false).unwrap(),
                expected,
                "pre {pre}: {line:?}"
            );
            differs_from_smollm |= expected != ids(&entry["ids"]);
        }
        if pre != "gpt2" {
            assert!(
                differs_from_smollm,
                "pre {pre} splits some line differently"
            );
        }
    }
}

#[test]
fn smollm2_decode_matches_transformers_and_round_trips() {
    let tok = smollm2();
    for entry in corpus() {
        let line = text(&entry["text"]);
        let line_ids = ids(&entry["ids"]);
        assert_eq!(
            tok.decode(&line_ids, false).unwrap(),
            text(&entry["decoded"]),
            "{line:?}"
        );
        assert_eq!(
            tok.decode(&line_ids, true).unwrap(),
            text(&entry["decoded_skip_special"]),
            "{line:?} skipping special tokens"
        );
        assert_eq!(
            tok.decode(&line_ids, false).unwrap(),
            line,
            "round trip of {line:?}"
        );
    }
    // Special tokens are dropped when skipped.
    let chat = tok.encode("<|im_start|>user\nHi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(&chat, true).unwrap(), "user\nHi");
}

#[test]
fn streaming_decode_prints_whole_characters() {
    let tok = smollm2();
    let mut held_back = 0;
    for entry in corpus() {
        let line = text(&entry["text"]);
        let line_ids = ids(&entry["ids"]);
        for skip in [false, true] {
            let (pieces, held) = stream(tok, &line_ids, skip);
            assert_eq!(
                pieces.concat(),
                tok.decode(&line_ids, skip).unwrap(),
                "{line:?}"
            );
            for piece in &pieces {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{line:?}: broken piece {piece:?}"
                );
            }
            held_back += held;
        }
    }
    assert!(held_back > 0, "some steps wait for the rest of a character");

    // "🎉" is three byte tokens: nothing is printed until the last one.
    let party = tok.encode("🎉", false).unwrap();
    assert!(party.len() >= 2, "{party:?}");
    let mut decoder = tok.stream_decoder(false);
    for &id in &party[..party.len() - 1] {
        assert_eq!(decoder.step(id).unwrap(), None);
    }
    assert_eq!(
        decoder.step(party[party.len() - 1]).unwrap().as_deref(),
        Some("🎉")
    );
    assert_eq!(decoder.flush().unwrap(), None);

    // Cut short, the held-back bytes come out at the flush, as a full decode shows them.
    let cut = &party[..party.len() - 1];
    let (pieces, _) = stream(tok, cut, false);
    assert_eq!(pieces.concat(), tok.decode(cut, false).unwrap());
    assert!(pieces.concat().contains('\u{FFFD}'));

    // A generated chat reply with special tokens skipped.
    let reply = tok
        .encode("<|im_start|>assistant\n日本語 🎉 ok<|im_end|>", false)
        .unwrap();
    let (pieces, _) = stream(tok, &reply, true);
    assert_eq!(pieces.concat(), "assistant\n日本語 🎉 ok");
}

#[test]
fn smollm2_chat_template_matches_apply_chat_template() {
    let tok = smollm2();
    let template = tok.chat_template().unwrap();
    let convs = conversations();
    let chats = expected()["chat"].as_array().unwrap();
    assert_eq!(chats.len(), 2 * convs.len());
    for chat in chats {
        let messages = &convs[text(&chat["conversation"])];
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(messages, add).unwrap();
        assert_eq!(rendered, text(&chat["text"]), "{}", chat["conversation"]);
        assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&chat["ids"]));
    }
}

#[test]
fn extra_templates_render_as_transformers() {
    let exp = load_json("templates.json");
    let convs = conversations();
    let specials: BTreeMap<String, String> =
        serde_json::from_value(exp["special_tokens_map"].clone()).unwrap();
    let mut cases = 0;
    for entry in exp["templates"].as_array().unwrap() {
        let name = text(&entry["name"]);
        let template = ChatTemplate::new(text(&entry["template"]), name)
            .unwrap()
            .with_variables(specials.clone());
        for case in entry["cases"].as_array().unwrap() {
            let messages = &convs[text(&case["conversation"])];
            let add = case["add_generation_prompt"].as_bool().unwrap();
            let rendered = template
                .render(messages, add)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                rendered,
                text(&case["text"]),
                "template {name}, {} add_generation_prompt={add}",
                case["conversation"]
            );
            cases += 1;
        }
    }
    assert!(cases >= 24, "{cases} cases");

    let raises = &exp["raises"];
    let source = exp["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == raises["template"])
        .unwrap();
    let template = ChatTemplate::new(text(&source["template"]), "features").unwrap();
    let messages: Vec<ChatMessage> = serde_json::from_value(raises["messages"].clone()).unwrap();
    let message = tokenizer_message(template.render(&messages, false));
    assert!(message.contains(text(&raises["message"])), "{message}");
}

#[test]
fn template_variables_and_errors() {
    let template = ChatTemplate::new(
        "{{ bos_token }}{{ messages[0].content }}{{ extra }}{{ strftime_now('%Y') | length }}",
        "inline",
    )
    .unwrap()
    .with_variables([("bos_token", "<s>")]);
    let mut extra = BTreeMap::new();
    extra.insert("extra".to_string(), serde_json::json!("!"));
    extra.insert("bos_token".to_string(), serde_json::json!("[BOS]"));
    let rendered = template
        .render_with(&[ChatMessage::user("hi")], false, &extra)
        .unwrap();
    assert_eq!(
        rendered, "[BOS]hi!4",
        "extra variables replace the special tokens"
    );
    assert_eq!(
        template.render(&[ChatMessage::user("hi")], false).unwrap(),
        "<s>hi4"
    );

    let message = tokenizer_message(ChatTemplate::new("{% for m in messages %}", "broken"));
    assert!(message.contains("chat template"), "{message}");
    let unknown_method =
        ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "m").unwrap();
    tokenizer_message(unknown_method.render(&[ChatMessage::user("x")], false));
}

#[test]
fn hf_folder_saved_by_transformers() {
    let exp = load_json("tiny_hf_expected.json");
    let tok = ModelTokenizer::from_hf_dir(fixture("tiny_hf")).unwrap();
    assert_eq!(tok.vocab_size() as u64, exp["vocab_size"].as_u64().unwrap());
    for key in [
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "unk_token_id",
    ] {
        let ours = match key {
            "bos_token_id" => tok.bos_token_id(),
            "eos_token_id" => tok.eos_token_id(),
            "pad_token_id" => tok.pad_token_id(),
            _ => tok.unk_token_id(),
        };
        assert_eq!(ours.map(u64::from), exp[key].as_u64(), "{key}");
    }
    // The saved post-processor adds BOS.
    assert!(tok.add_bos_token());
    assert!(!tok.add_eos_token());
    for entry in exp["encode"].as_array().unwrap() {
        let line = text(&entry["text"]);
        assert_eq!(
            tok.encode(line, false).unwrap(),
            ids(&entry["ids"]),
            "{line:?}"
        );
        let with_special = tok.encode(line, true).unwrap();
        assert_eq!(with_special, ids(&entry["ids_with_special"]), "{line:?}");
        assert_eq!(
            tok.decode(&with_special, true).unwrap(),
            text(&entry["decoded_skip_special"]),
            "{line:?}"
        );
    }
    let template = tok.chat_template().unwrap();
    let convs = conversations();
    for chat in exp["chat"].as_array().unwrap() {
        let messages = &convs[text(&chat["conversation"])];
        let add = chat["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(template.render(messages, add).unwrap(), text(&chat["text"]));
    }
}

#[test]
fn hf_folder_errors() {
    let dir = tempfile::tempdir().unwrap();
    match ModelTokenizer::from_hf_dir(dir.path()) {
        Err(ModelError::NotFound { path, .. }) => assert!(path.ends_with("tokenizer.json")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
    let message = tokenizer_message(ModelTokenizer::from_hf_dir(dir.path()));
    assert!(message.contains("cannot load"), "{message}");

    std::fs::copy(
        fixture("tiny_hf/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<nope>"}"#,
    )
    .unwrap();
    let message = tokenizer_message(ModelTokenizer::from_hf_dir(dir.path()));
    assert!(message.contains("<nope>"), "{message}");

    // Explicit flags replace the saved post-processor: no BOS, EOS at the end.
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": false, "add_eos_token": true, "chat_template": "{{ eos_token }}"}"#,
    )
    .unwrap();
    let tok = ModelTokenizer::from_hf_dir(dir.path()).unwrap();
    let eos = tok.eos_token_id().unwrap();
    let plain = tok.encode("Hello", false).unwrap();
    let mut with_eos = plain.clone();
    with_eos.push(eos);
    assert_eq!(tok.encode("Hello", true).unwrap(), with_eos);
    assert!(!tok.add_bos_token() && tok.add_eos_token());
    assert_eq!(
        tok.chat_template().unwrap().render(&[], false).unwrap(),
        "</s>"
    );
}

/// A tiny byte-level vocabulary: the 256 byte characters, `Ġt`, `he`, `Ġthe`, two control
/// tokens and one user-defined token.
fn tiny_metadata() -> BTreeMap<String, GgufValue> {
    let mut tokens: Vec<String> = vec!["<s>".into(), "</s>".into(), "<think>".into()];
    let mut types = vec![3i32, 3, 4];
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            let rank = (0..b)
                .filter(|&x| {
                    !((0x21..=0x7e).contains(&x)
                        || (0xa1..=0xac).contains(&x)
                        || (0xae..=0xff).contains(&x))
                })
                .count() as u32;
            char::from_u32(0x100 + rank).unwrap()
        };
        tokens.push(c.to_string());
        types.push(1);
    }
    for merged in ["Ġt", "he", "Ġthe"] {
        tokens.push(merged.into());
        types.push(1);
    }
    let strings =
        |items: Vec<String>| GgufValue::Array(items.into_iter().map(GgufValue::String).collect());
    let mut map = BTreeMap::new();
    map.insert(
        "tokenizer.ggml.model".into(),
        GgufValue::String("gpt2".into()),
    );
    map.insert(
        "tokenizer.ggml.pre".into(),
        GgufValue::String("gpt2".into()),
    );
    map.insert("tokenizer.ggml.tokens".into(), strings(tokens));
    map.insert(
        "tokenizer.ggml.token_type".into(),
        GgufValue::Array(types.into_iter().map(GgufValue::I32).collect()),
    );
    map.insert(
        "tokenizer.ggml.merges".into(),
        strings(vec!["Ġ t".into(), "h e".into(), "Ġt he".into()]),
    );
    map.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(0));
    map.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(1));
    map.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
    map.insert("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(true));
    map
}

#[test]
fn tiny_gguf_vocabulary_adds_bos_eos_and_keeps_user_defined_tokens() {
    let tok = ModelTokenizer::from_gguf_metadata(&tiny_metadata(), "tiny").unwrap();
    let the = tok.token_to_id("Ġthe").unwrap();
    let body = tok.encode("a the<think>", false).unwrap();
    assert_eq!(body[1], the, "merges apply: {body:?}");
    assert_eq!(body.last(), Some(&2), "<think> is matched whole");
    assert_eq!(
        tok.encode("a the<think>", true).unwrap(),
        [vec![0], body.clone(), vec![1]].concat()
    );
    assert!(tok.add_bos_token() && tok.add_eos_token());
    // <think> is an added token but not special: kept when special tokens are skipped.
    let ids = tok.encode("<s>x<think></s>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "x<think>");
    assert_eq!(tok.decode(&ids, false).unwrap(), "<s>x<think></s>");
    assert!(
        tok.chat_template().is_err(),
        "no chat template in the metadata"
    );
}

#[test]
fn bad_gguf_metadata_is_a_tokenizer_error() {
    let base = tiny_metadata();
    let with = |key: &str, value: GgufValue| {
        let mut map = base.clone();
        map.insert(key.into(), value);
        map
    };
    let without = |key: &str| {
        let mut map = base.clone();
        map.remove(key);
        map
    };
    let cases: Vec<(BTreeMap<String, GgufValue>, &str)> = vec![
        (without("tokenizer.ggml.model"), "no tokenizer"),
        (
            with("tokenizer.ggml.model", GgufValue::String("llama".into())),
            "`llama` is not supported",
        ),
        (
            with("tokenizer.ggml.pre", GgufValue::String("mystery".into())),
            "`mystery` is not supported; supported: default, gpt2, smollm",
        ),
        (
            without("tokenizer.ggml.tokens"),
            "`tokenizer.ggml.tokens` is missing",
        ),
        (
            without("tokenizer.ggml.merges"),
            "`tokenizer.ggml.merges` is missing",
        ),
        (
            with("tokenizer.ggml.tokens", GgufValue::String("x".into())),
            "expected an array",
        ),
        (
            with(
                "tokenizer.ggml.token_type",
                GgufValue::Array(vec![GgufValue::I32(1); 5]),
            ),
            "`tokenizer.ggml.token_type` has 5 entries but `tokenizer.ggml.tokens` has 262",
        ),
        (
            with(
                "tokenizer.ggml.merges",
                GgufValue::Array(vec![GgufValue::String("abc".into())]),
            ),
            "not two tokens",
        ),
        (
            with(
                "tokenizer.ggml.merges",
                GgufValue::Array(vec![GgufValue::String("Ġ zzz".into())]),
            ),
            "byte-level BPE",
        ),
        (
            with("tokenizer.ggml.bos_token_id", GgufValue::U32(262)),
            "`tokenizer.ggml.bos_token_id` = 262 is outside the vocabulary of 262 tokens",
        ),
        (
            with("tokenizer.ggml.eos_token_id", GgufValue::String("2".into())),
            "expected an integer",
        ),
        (
            with("tokenizer.ggml.add_bos_token", GgufValue::U8(1)),
            "expected a bool",
        ),
    ];
    for (metadata, expected) in cases {
        let message = tokenizer_message(ModelTokenizer::from_gguf_metadata(&metadata, "bad.gguf"));
        assert!(message.contains(expected), "{message:?} lacks {expected:?}");
    }
    assert!(SUPPORTED_PRE_TOKENIZERS.contains(&"smollm"));
    assert!(SUPPORTED_PRE_TOKENIZERS.contains(&"llama-bpe"));
}

#[test]
fn ids_outside_the_vocabulary_are_errors() {
    let tok = smollm2();
    let size = tok.vocab_size() as u32;
    let message = tokenizer_message(tok.decode(&[1, size, 2], false));
    assert!(
        message.contains(&format!("token id {size} is outside")),
        "{message}"
    );
    let mut decoder = tok.stream_decoder(false);
    assert!(decoder.step(100).is_ok());
    tokenizer_message(decoder.step(u32::MAX));
    assert_eq!(tok.id_to_token(size), None);
}
