//! Small text helpers shared by modules that keep bounded copies of text they did not write.

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_a_character_boundary() {
        assert_eq!(truncate("héllo".into(), 2), "h", "é is two bytes");
        assert_eq!(truncate("héllo".into(), 3), "hé");
        assert_eq!(truncate("hi".into(), 10), "hi");
    }
}
