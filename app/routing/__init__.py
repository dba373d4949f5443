"""Which upstream and which key serve a request, and the retry policy across them."""
