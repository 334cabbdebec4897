"""Self-contained HTML pages: every script, style, picture and sound inlined, opened from disk with no server."""
