"""Mobile push sender: device tokens, FCM HTTP v1 for Android and APNs over HTTP/2 for iOS (channel "mobile")."""
