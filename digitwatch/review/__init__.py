"""The review station: a local web page and a small JSON API over the review queue."""
