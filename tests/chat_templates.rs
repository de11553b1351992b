//! Chat templates: rendered exactly as transformers renders them (SmolLM2-Instruct's real
//! template against `../shared/golden/smollm2-135m-instruct-chat.json`), a Llama-3-style
//! fixture against strings written by hand, where a model's template is found, and the errors
//! a chat request gets — through the library and through a running server.

mod common;

use cllm::model::chat_template::ChatTemplate;
use common::server::TestServer;
use common::{repo_root, require, shared_dir};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn stories() -> PathBuf {
    repo_root().join("models/stories260K")
}

fn fixture_template(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/chat_templates").join(name)
}

/// The SmolLM2 chat golden file, or a visible skip (a failure under CI).
fn smollm2_chat_golden() -> Option<Value> {
    let path = shared_dir().map(|d| d.join("golden/smollm2-135m-instruct-chat.json"));
    let path = path.filter(|p| p.is_file());
    if !require(
        path.is_some(),
        "../shared/golden/smollm2-135m-instruct-chat.json",
    ) {
        return None;
    }
    let text = std::fs::read_to_string(path?).expect("read golden");
    Some(serde_json::from_str(&text).expect("golden JSON"))
}

fn messages_of(case: &Value) -> Vec<Value> {
    case["messages"].as_array().expect("messages").clone()
}

#[test]
fn smollm2_template_renders_what_transformers_renders() {
    let Some(golden) = smollm2_chat_golden() else {
        return;
    };
    let source = golden["chat_template"].as_str().expect("template");
    // The fixture in the repository is that same template.
    let fixture =
        std::fs::read_to_string(fixture_template("chatml-smollm2.jinja")).expect("fixture");
    assert_eq!(fixture, source);
    let template =
        ChatTemplate::new(source, Some("<|im_start|>"), Some("<|im_end|>")).expect("compiles");
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 3);
    for case in cases {
        let rendered = template.render(&messages_of(case), true).expect("renders");
        assert_eq!(rendered, case["prompt"].as_str().expect("prompt"));
    }
}

const LLAMA3_CONVERSATION: &str = r#"[
    {"role": "system", "content": "  You are terse.\n"},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"}
]"#;

/// Written by hand from the template's rules: the system text trimmed, each turn between
/// header tokens and ended by <|eot_id|>, then the assistant header.
const LLAMA3_EXPECTED: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

#[test]
fn llama3_style_template_renders_the_hand_written_string() {
    let source = std::fs::read_to_string(fixture_template("llama3-style.jinja")).expect("fixture");
    let template = ChatTemplate::new(&source, Some("<|begin_of_text|>"), Some("<|eot_id|>"))
        .expect("compiles");
    let messages: Vec<Value> = serde_json::from_str(LLAMA3_CONVERSATION).expect("json");
    assert_eq!(
        template.render(&messages, true).expect("renders"),
        LLAMA3_EXPECTED
    );
    let without_prompt = template.render(&messages, false).expect("renders");
    assert_eq!(
        without_prompt,
        LLAMA3_EXPECTED.trim_end_matches("<|start_header_id|>assistant<|end_header_id|>\n\n")
    );
    // No system turn: none is rendered. Roles out of order: the template's own exception.
    let user_only = vec![json!({"role": "user", "content": "Yo"})];
    assert_eq!(
        template.render(&user_only, false).expect("renders"),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nYo<|eot_id|>"
    );
    let bad = vec![json!({"role": "assistant", "content": "first"})];
    assert_eq!(
        template.render(&bad, true).expect_err("alternation"),
        "Conversation roles must alternate user/assistant/user/assistant/..."
    );
}

/// A copy of stories260K whose tokenizer folder says `extra` (file name → contents).
fn model_copy(dir: &Path, extra: &[(&str, String)]) -> PathBuf {
    let model = dir.join("stories-chat");
    std::fs::create_dir_all(&model).expect("mkdir");
    for entry in std::fs::read_dir(stories()).expect("read model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), model.join(entry.file_name())).expect("copy");
    }
    for (name, contents) in extra {
        std::fs::write(model.join(name), contents).expect("write");
    }
    model
}

async fn templated_text(server: &TestServer, messages: Value) -> (u16, Value) {
    let r = server
        .post("/chat_tokenize", json!({ "messages": messages }))
        .await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_folder_template_is_found_and_chat_tokenize_shows_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let user = json!([{"role": "user", "content": "Hi"}]);
    // tokenizer_config.json with a list of named templates: the default one is used.
    let config = json!({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"},
        ],
    });
    let list = model_copy(
        &tmp.path().join("a"),
        &[("tokenizer_config.json", config.to_string())],
    );
    let server = TestServer::start(&list, |_| {}).await;
    let (status, body) = templated_text(&server, user.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["templated_text"], "<s>[user] Hi");
    // OpenAI's `developer` role reaches templates as `system`, the role they know.
    let developer =
        json!([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    assert_eq!(
        templated_text(&server, developer).await.1["templated_text"],
        "<s>[system] Be brief.[user] Hi"
    );
    // The rendered text is tokenized without adding special tokens: <s> appears once.
    let ids: Vec<u64> = body["tokenize_response"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1, "{ids:?}");
    let first = &body["tokenize_response"][0];
    assert_eq!(
        (first["start"].as_u64(), first["stop"].as_u64()),
        (Some(0), Some(3))
    );
    server.shutdown().await;

    // chat_template.jinja beside it wins over tokenizer_config.json.
    let jinja = model_copy(
        &tmp.path().join("b"),
        &[
            ("tokenizer_config.json", config.to_string()),
            (
                "chat_template.jinja",
                "J:{{ messages[0].content }}".to_string(),
            ),
        ],
    );
    let server = TestServer::start(&jinja, |_| {}).await;
    assert_eq!(
        templated_text(&server, user.clone()).await.1["templated_text"],
        "J:Hi"
    );
    server.shutdown().await;

    // --chat-template FILE overrides both; content parts are joined.
    let server = TestServer::start(&jinja, |c| {
        c.model.chat_template = Some(fixture_template("llama3-style.jinja"));
    })
    .await;
    let parts = json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    let (status, body) = templated_text(&server, parts).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["templated_text"],
        "<s><|start_header_id|>user<|end_header_id|>\n\na\nb<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_without_a_template_or_with_a_failing_one_is_a_clear_400() {
    let server = TestServer::start(&stories(), |_| {}).await;
    let chat = json!({"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}]});
    let r = server.post("/v1/chat/completions", chat.clone()).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("--chat-template"),
        "{body}"
    );
    // TGI's route keeps TGI's shape and status.
    let r = server
        .post(
            "/chat_tokenize",
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error_type"],
        "validation"
    );
    server.shutdown().await;

    let server = TestServer::start(&stories(), |c| {
        c.model.chat_template = Some(fixture_template("llama3-style.jinja"));
    })
    .await;
    let bad = json!({"messages": [{"role": "assistant", "content": "first"}]});
    let r = server.post("/v1/chat/completions", bad).await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["param"], "messages");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("message")
            .contains("Conversation roles must alternate"),
        "{body}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_broken_template_file_stops_the_start_with_its_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("broken.jinja");
    std::fs::write(&file, "{% for m in messages %}{{ m.content }").expect("write");
    let mut config = cllm::config::ServerConfig::default();
    config.model.path = Some(stories());
    config.model.chat_template = Some(file);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = cllm::server::serve(listener, config, std::future::pending())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("broken.jinja"), "{err}");
}
