//! Chat messages: their JSON shape (content as a string or a list of text parts), rendering
//! through the model's chat template into prompt ids, and TGI's `POST /chat_tokenize`.

use super::body::JsonBody;
use super::AppState;
use crate::error::{invalid_param, ApiError};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// One message of a conversation.
#[derive(Deserialize, Debug, Clone)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub name: Option<String>,
    /// An assistant turn's tool calls: refused when given, as `tools` is.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// The older form of `tool_calls`: refused too.
    #[serde(default)]
    pub function_call: Option<Value>,
    /// A tool turn's reference to the call it answers; passed to the template.
    #[serde(default)]
    pub tool_call_id: Option<String>,
}

/// The roles OpenAI's API takes.
const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// A message's content: a string, or a list of parts (only text parts are supported).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Debug, Clone)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// The messages as the template sees them: `{role, content[, name]}` with text content (parts
/// joined by newlines, as vLLM joins them).
fn template_messages(messages: &[ChatMessage]) -> Result<Vec<Value>, ApiError> {
    if messages.is_empty() {
        return Err(invalid_param("messages", "`messages` must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !ROLES.contains(&m.role.as_str()) {
                let param = format!("messages[{i}].role");
                let message = format!(
                    "{param}: `{}` is not a role (system, developer, user, assistant, tool, \
                     function)",
                    m.role
                );
                return Err(invalid_param(param, message));
            }
            let used = |v: &Option<Value>| {
                v.as_ref()
                    .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
            };
            for (field, value) in [
                ("tool_calls", &m.tool_calls),
                ("function_call", &m.function_call),
            ] {
                if used(value) {
                    let param = format!("messages[{i}].{field}");
                    let message = format!("{param}: tool calls are not supported (nor is `tools`)");
                    return Err(invalid_param(param, message));
                }
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(text)) => text.clone(),
                Some(Content::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        let param = format!("messages[{i}].content[{j}]");
                        match (&*part.kind, &part.text) {
                            ("text", Some(text)) => texts.push(text.as_str()),
                            ("text", None) => {
                                let message = format!("{param}: a text part needs `text`");
                                return Err(invalid_param(param, message));
                            }
                            (other, _) => {
                                return Err(invalid_param(
                                    format!("{param}.type"),
                                    format!(
                                        "{param}.type: content parts of type `{other}` are not \
                                         supported; only `text`"
                                    ),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            // OpenAI's newer name for the system role; chat templates know only `system`.
            let role = if m.role == "developer" {
                "system"
            } else {
                m.role.as_str()
            };
            let mut message = json!({ "role": role, "content": content });
            if let Some(name) = &m.name {
                message["name"] = json!(name);
            }
            if let Some(id) = &m.tool_call_id {
                message["tool_call_id"] = json!(id);
            }
            Ok(message)
        })
        .collect()
}

/// The prompt a conversation renders to. Tokenize it without adding special tokens: the
/// template writes them.
pub fn render_prompt(state: &AppState, messages: &[ChatMessage]) -> Result<String, ApiError> {
    let template = state
        .chat_template
        .as_ref()
        .map_err(|why| invalid_param("messages", why.clone()))?;
    let messages = template_messages(messages)?;
    template
        .render(&messages, true)
        .map_err(|e| invalid_param("messages", format!("chat template error: {e}")))
}

/// `POST /chat_tokenize` body: a chat request (only `messages` matters here).
#[derive(Deserialize)]
pub struct ChatTokenizeRequest {
    messages: Vec<ChatMessage>,
}

/// `POST /chat_tokenize`: the rendered prompt and its tokens, in TGI's shape.
pub async fn chat_tokenize(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<ChatTokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = render_prompt(&state, &request.messages)?;
    let (ids, offsets) = state
        .tokenizer
        .encode_with_offsets(&prompt, false)
        .map_err(|e| ApiError::Internal(format!("tokenizer: {e}")))?;
    let tokens = super::admin::token_spans(&prompt, &ids, offsets);
    Ok(Json(
        json!({ "tokenize_response": tokens, "templated_text": prompt }),
    ))
}
