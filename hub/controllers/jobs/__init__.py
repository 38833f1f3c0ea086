"""The jobs controller: hands one-shot jobs out, follows reports, deadlines and expiry."""
