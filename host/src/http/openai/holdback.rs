//! Stop sequences in OpenAI's answers: the text ends before the first stop sequence, and a
//! stream never sends text that may turn out to be the start of one. Text that could still
//! become a stop sequence is held back until the next token decides it.

/// The text of `text` before its first stop sequence (all of it when none occurs).
pub fn truncate_at_stop<'t>(text: &'t str, stops: &[String]) -> &'t str {
    &text[..earliest_stop(text, stops).unwrap_or(text.len())]
}

/// Byte offset where the earliest stop sequence in `text` begins.
fn earliest_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Length in bytes of the longest end of `text` that is the beginning of a stop sequence.
fn partial_stop_len(text: &str, stops: &[String]) -> usize {
    let mut longest = 0;
    for stop in stops {
        for (end, _) in stop.char_indices().skip(1) {
            // `stop[..end]` is a proper prefix ending on a character boundary.
            if end > longest && text.ends_with(&stop[..end]) {
                longest = end;
            }
        }
    }
    longest
}

/// One choice's streamed text: what may be sent now, and what must wait.
pub struct Holdback {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already sent; no stop sequence can begin before this.
    sent: usize,
    /// A stop sequence was found: nothing more is sent.
    done: bool,
}

impl Holdback {
    pub fn new(stops: Vec<String>) -> Holdback {
        Holdback {
            stops,
            text: String::new(),
            sent: 0,
            done: false,
        }
    }

    /// Adds a token's text; returns the text that can be sent now (possibly empty).
    pub fn push(&mut self, piece: &str) -> String {
        if self.done {
            return String::new();
        }
        self.text.push_str(piece);
        let unsent = &self.text[self.sent..];
        let end = match earliest_stop(unsent, &self.stops) {
            Some(at) => {
                self.done = true;
                self.sent + at
            }
            None => self.text.len() - partial_stop_len(unsent, &self.stops),
        };
        self.take_until(end)
    }

    /// The sequence ended: whatever was held back and is not a stop sequence.
    pub fn finish(&mut self) -> String {
        if self.done {
            return String::new();
        }
        self.done = true;
        let unsent = &self.text[self.sent..];
        let end = self.sent + earliest_stop(unsent, &self.stops).unwrap_or(unsent.len());
        self.take_until(end)
    }

    fn take_until(&mut self, end: usize) -> String {
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    /// Streams `pieces` and checks the deltas join to the non-streamed text.
    fn stream(pieces: &[&str], stop_list: &[&str]) -> (Vec<String>, String) {
        let mut h = Holdback::new(stops(stop_list));
        let mut deltas: Vec<String> = pieces.iter().map(|p| h.push(p)).collect();
        deltas.push(h.finish());
        let joined: String = deltas.concat();
        let full: String = pieces.concat();
        assert_eq!(joined, truncate_at_stop(&full, &stops(stop_list)));
        (deltas, joined)
    }

    #[test]
    fn a_stop_split_across_tokens_is_never_partly_sent() {
        let (deltas, joined) = stream(&["Once", " upon", " a", " ti", "me there"], &["a time"]);
        assert_eq!(joined, "Once upon ");
        assert_eq!(deltas, ["Once", " upon", " ", "", "", ""]);
    }

    #[test]
    fn a_false_start_is_released_when_decided() {
        let (deltas, joined) = stream(&["x", " a", " t", "ree"], &["a time"]);
        assert_eq!(joined, "x a tree");
        assert_eq!(deltas, ["x", " ", "", "a tree", ""]);
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        let (_, joined) = stream(&["ab", "c"], &["cd"]);
        assert_eq!(joined, "abc");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_text_is_whole() {
        let (_, joined) = stream(&["héllo wö", "rld"], &["wörld", "llo"]);
        assert_eq!(joined, "hé");
        let (_, joined) = stream(&["日本", "語です"], &["語で"]);
        assert_eq!(joined, "日本");
    }

    #[test]
    fn no_stops_means_everything_at_once() {
        let (deltas, _) = stream(&["a", "b"], &[]);
        assert_eq!(deltas, ["a", "b", ""]);
    }
}
