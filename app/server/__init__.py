"""`edgegen serve`: a local HTTP + WebSocket API in ComfyUI's client shapes, over a persistent SQLite queue."""
