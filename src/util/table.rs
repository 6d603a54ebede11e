//! Plain text tables for the terminal (comfy-table without borders), sized to the terminal
//! on stdout when it is one: the layer every report, worksheet and status view prints with.

/// A table as text, without the padding its last column would add at each line's end.
pub fn render(t: &comfy_table::Table) -> String {
    let mut s = String::new();
    for line in t.to_string().lines() {
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// A plain table (no borders, left-aligned) that fits `width` columns when given; numbers
/// are right-aligned by the caller's choice of [`align_right`].
pub fn table(header: &[&str], width: Option<u16>) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_header(header.to_vec());
    match width {
        Some(w) => {
            t.set_width(w)
                .set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
        }
        None => {
            t.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
        }
    }
    t
}

/// Right-aligns the given columns of a table (counts, money).
pub fn align_right(t: &mut comfy_table::Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
}

/// The width of the terminal on stdout, if stdout is one.
pub fn terminal_width() -> Option<u16> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ fills a winsize struct we own.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_col > 0 {
            return Some(ws.ws_col);
        }
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok())
}
