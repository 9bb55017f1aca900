"""Looking inside a run: attention diagnostics recorded while captions are written."""
