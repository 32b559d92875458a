"""The email sender: drains the queue's ``email`` channel over pooled SMTP connections."""
