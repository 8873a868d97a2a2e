"""Small helpers: logging, drawing."""
