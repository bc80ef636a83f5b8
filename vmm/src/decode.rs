//! Decoding guest instructions for error reports.

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

/// `bytes` at `rip` as "`mnemonic operands` (hex bytes)".
pub fn describe_instruction(bytes: &[u8], rip: u64) -> String {
    if bytes.is_empty() {
        return "an instruction at an unmapped address".to_string();
    }
    let mut d = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let insn = d.decode();
    let len = insn.len().min(bytes.len());
    let hex: Vec<String> = bytes.iter().take(len.max(1)).map(|b| format!("{b:02x}")).collect();
    if insn.is_invalid() {
        return format!("an undecodable instruction ({})", hex.join(" "));
    }
    let mut text = String::new();
    IntelFormatter::new().format(&insn, &mut text);
    format!("`{text}` ({})", hex.join(" "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_xgetbv() {
        let s = super::describe_instruction(&[0x0f, 0x01, 0xd0, 0x90], 0xffff_ffff_8100_0000);
        assert!(s.contains("xgetbv"), "{s}");
        assert!(s.contains("0f 01 d0"), "{s}");
    }
}
