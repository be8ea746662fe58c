"""The native Eagle2 engine: model, loader, tiny default, prompt, generation, scheduler."""
