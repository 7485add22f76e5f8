"""llama.cpp's native server API (`llama-server`'s /completion, /infill, /props, /slots, ...)."""
