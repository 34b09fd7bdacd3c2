"""What the ServerApp and the ClientApp share: the run config and the wire protocol.

This layer sits below strategies/, client/ and server/ (DESIGN.md section 5): both apps
import it, it imports neither. `config` is the one validated run config (sectioned);
`protocol` names the records and keys of every message.
"""
