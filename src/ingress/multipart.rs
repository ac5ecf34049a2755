//! One field of a `multipart/form-data` body: the `model` of an audio transcription or
//! translation (vLLM's `/v1/audio/*` take a form: the file and its parameters), which a
//! key's model allow-list must see like a JSON body's.
//!
//! Written here rather than taken from a multipart crate: the body is already in memory
//! (read once, bounded by `--max-body-bytes`) and only one small text field is wanted,
//! so a scan for the boundary and one header line is all it takes. Every length is
//! bounded: the boundary (RFC 2046: at most 70 characters), a part's headers, the value.

use memchr::memmem;

/// Longest header block of one part.
const MAX_PART_HEADERS: usize = 8 * 1024;

/// Why a form could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("multipart/form-data needs a boundary of 1 to 70 characters")]
    Boundary,
    #[error("form field `{0}` is longer than {1} bytes")]
    TooLong(String, usize),
    #[error("form field `{0}` is not UTF-8 text")]
    NotText(String),
    #[error("a part of the form has headers longer than {MAX_PART_HEADERS} bytes or none at all")]
    Headers,
}

/// The boundary of a `multipart/form-data` content type; `None` for any other type.
pub fn boundary(content_type: &str) -> Option<Result<&str, FormError>> {
    let mut params = content_type.split(';');
    let kind = params.next()?.trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let boundary = params.find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"'))
    });
    Some(match boundary {
        Some(b) if !b.is_empty() && b.len() <= 70 => Ok(b),
        _ => Err(FormError::Boundary),
    })
}

/// The text of the first field called `name` (a part without a file name), at most
/// `max` bytes; `None` when the form has no such field.
pub fn field<'a>(
    body: &'a [u8],
    boundary: &str,
    name: &str,
    max: usize,
) -> Result<Option<&'a str>, FormError> {
    let delimiter = format!("--{boundary}");
    let finder = memmem::Finder::new(delimiter.as_bytes());
    let mut at = match finder.find(body) {
        Some(at) => at + delimiter.len(),
        None => return Ok(None),
    };
    loop {
        let rest = &body[at..];
        // `--` after a delimiter closes the form.
        if rest.starts_with(b"--") {
            return Ok(None);
        }
        let rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
        let head_end = memmem::find(&rest[..rest.len().min(MAX_PART_HEADERS + 4)], b"\r\n\r\n")
            .ok_or(FormError::Headers)?;
        let (headers, content) = (&rest[..head_end], &rest[head_end + 4..]);
        let next = finder.find(content);
        let value = match next {
            // The value ends at the CRLF before the next delimiter.
            Some(end) => content[..end].strip_suffix(b"\r\n").unwrap_or(&content[..end]),
            None => content,
        };
        if names_field(headers, name) {
            if value.len() > max {
                return Err(FormError::TooLong(name.to_owned(), max));
            }
            return std::str::from_utf8(value).map(Some).map_err(|_| FormError::NotText(name.to_owned()));
        }
        match next {
            Some(end) => at = body.len() - content.len() + end + delimiter.len(),
            None => return Ok(None),
        }
    }
}

/// Whether a part's headers name the field `name` (and not a file).
fn names_field(headers: &[u8], name: &str) -> bool {
    let Ok(headers) = std::str::from_utf8(headers) else { return false };
    headers.split("\r\n").any(|line| {
        let Some((header, value)) = line.split_once(':') else { return false };
        if !header.trim().eq_ignore_ascii_case("content-disposition") {
            return false;
        }
        let mut params = value.split(';').skip(1).filter_map(|p| p.split_once('='));
        let mut named = false;
        for (key, value) in &mut params {
            match key.trim().to_ascii_lowercase().as_str() {
                "name" => named = value.trim().trim_matches('"') == name,
                "filename" | "filename*" => return false,
                _ => {}
            }
        }
        named
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF\x00\x01model\r\n--XyZ\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nwhisper-large\r\n--XyZ\r\nContent-Disposition: form-data; name=language\r\n\r\nen\r\n--XyZ--\r\n";

    #[test]
    fn the_model_field_is_found_past_a_file() {
        assert_eq!(boundary("multipart/form-data; boundary=XyZ"), Some(Ok("XyZ")));
        assert_eq!(boundary("Multipart/Form-Data; charset=x; boundary=\"XyZ\""), Some(Ok("XyZ")));
        assert_eq!(boundary("application/json"), None);
        assert_eq!(boundary("multipart/form-data"), Some(Err(FormError::Boundary)));
        assert_eq!(field(FORM, "XyZ", "model", 256), Ok(Some("whisper-large")));
        assert_eq!(field(FORM, "XyZ", "language", 256), Ok(Some("en")));
        assert_eq!(field(FORM, "XyZ", "prompt", 256), Ok(None));
        assert_eq!(field(FORM, "XyZ", "model", 4), Err(FormError::TooLong("model".into(), 4)));
        // A file part named `model` is not the field.
        let file = b"--b\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m\"\r\n\r\nx\r\n--b--";
        assert_eq!(field(file, "b", "model", 256), Ok(None));
        assert_eq!(field(b"no delimiter at all", "b", "model", 256), Ok(None));
        assert_eq!(field(b"--b\r\nheaders without end", "b", "model", 256), Err(FormError::Headers));
    }

    proptest::proptest! {
        /// Whatever the bytes, reading a field ends without a panic.
        #[test]
        fn any_bytes_are_read_or_refused(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = field(&body, "b", "model", 64);
            let mut framed = b"--b\r\n".to_vec();
            framed.extend_from_slice(&body);
            let _ = field(&framed, "b", "model", 64);
        }
    }
}
