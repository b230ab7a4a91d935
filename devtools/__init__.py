"""Developer tools: the ComfyUI host, model fixtures, the demo. Not used by the nodes."""
