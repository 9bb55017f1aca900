"""`neverfade demo`: a local web page that captions an image with several methods side by side, streaming."""
