"""Local stand-ins for upstream model servers, served for real over HTTP."""
