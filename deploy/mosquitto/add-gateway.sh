#!/bin/sh
# Let one gateway log in to the fieldlink cloud Mosquitto: user "<site>/<gateway>".
#
#   deploy/mosquitto/add-gateway.sh [options] SITE GATEWAY
#
# Adds the user to the password file with a new random password, printed alone on
# stdout (once: the file keeps only its hash), e.g.
#   PASSWORD=$(deploy/mosquitto/add-gateway.sh --reload plant-a gw-01)
# Idempotent: a user that exists is left as it is, unless --rotate or --password-file.
# No ACL line is written per gateway: fieldlink.acl grants every "<site>/<gateway>"
# user its own topics through %u patterns. If the ACL file is missing, the shipped
# one is installed; if it lacks those patterns, this stops and says so.
#
# Gateways with client certificates (listener 8884) need no password: issue a
# certificate whose CN is "<site>/<gateway>" (openssl: -subj "/CN=plant-a\/gw-01").
set -eu

DEFAULT_PASSWD=/etc/mosquitto/fieldlink.passwd
DEFAULT_ACL=/etc/mosquitto/fieldlink.acl
PASSWD=$DEFAULT_PASSWD
ACL=$DEFAULT_ACL
PASSWORD_FILE=
ROTATE=no
RELOAD=no
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
    cat <<EOF
usage: $0 [options] SITE GATEWAY

Adds user "SITE/GATEWAY" to the Mosquitto password file; prints a new random
password on stdout (only when it sets one). Messages go to stderr.

  --passwd FILE          password file (default $DEFAULT_PASSWD); created if missing
  --acl FILE             ACL file to check (default $DEFAULT_ACL); installed from
                         $HERE/fieldlink.acl if missing
  --password-file FILE   take the password from FILE (its first line) instead of
                         generating one; sets it even if the user exists
  --rotate               set a new random password even if the user exists
  --reload               systemctl reload mosquitto afterwards (Mosquitto reads
                         the password and ACL files again on SIGHUP)
  -h, --help             this text

SITE and GATEWAY are the gateway's gateway.site and gateway.id: not empty, no
'/', '+', '#', no leading '\$' (the topic level rules), no ':' (the password
file's separator), and a site does not start with '-'.
EOF
}

die() {
    echo "add-gateway: $*" >&2
    exit 2
}

SITE=
GATEWAY=
COUNT=0
positional() {
    COUNT=$((COUNT + 1))
    case $COUNT in
        1) SITE=$1 ;;
        2) GATEWAY=$1 ;;
    esac
}
while [ $# -gt 0 ]; do
    case $1 in
        --passwd) [ $# -ge 2 ] || die "--passwd needs a file"; PASSWD=$2; shift 2 ;;
        --acl) [ $# -ge 2 ] || die "--acl needs a file"; ACL=$2; shift 2 ;;
        --password-file) [ $# -ge 2 ] || die "--password-file needs a file"; PASSWORD_FILE=$2; shift 2 ;;
        --rotate) ROTATE=yes; shift ;;
        --reload) RELOAD=yes; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; for arg in "$@"; do positional "$arg"; done; break ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) positional "$1"; shift ;;
    esac
done
[ "$COUNT" -eq 2 ] || { usage >&2; die "expected SITE and GATEWAY, got $COUNT argument(s)"; }

# The same rules as fieldlink.wire.check_topic_level: then "<site>/<gateway>" has
# exactly one "/", and the ACL's %u patterns expand to exactly these two levels.
check_level() {
    case $2 in
        '') die "$1 must not be empty" ;;
        *[/+#]*) die "$1 must not contain '/', '+' or '#', got '$2'" ;;
        '$'*) die "$1 must not start with '\$', got '$2'" ;;
        *:*) die "$1 must not contain ':' (the password file's separator), got '$2'" ;;
        -*) [ "$1" = gateway ] || die "$1 must not start with '-' (mosquitto_passwd takes it for an option), got '$2'" ;;
    esac
}
check_level site "$SITE"
check_level gateway "$GATEWAY"
USERNAME="$SITE/$GATEWAY"

command -v mosquitto_passwd >/dev/null 2>&1 || die "mosquitto_passwd not found: apt-get install mosquitto"

# The files hold hashes and rules, not secrets, but nobody else needs to read them;
# Mosquitto reads them as its own user (group mosquitto on Debian).
restrict() {
    chmod 0640 "$1"
    if getent group mosquitto >/dev/null 2>&1; then
        chgrp mosquitto "$1" 2>/dev/null ||
            echo "add-gateway: warning: cannot chgrp mosquitto $1: Mosquitto must be able to read it" >&2
    fi
}

# --- ACL: the shipped patterns, nothing per gateway -----------------------------------
if [ ! -e "$ACL" ]; then
    [ -r "$HERE/fieldlink.acl" ] || die "$ACL is missing and $HERE/fieldlink.acl is not there to install"
    cp "$HERE/fieldlink.acl" "$ACL"
    restrict "$ACL"
    echo "add-gateway: installed $ACL from $HERE/fieldlink.acl" >&2
fi
if ! grep -Eq '^pattern[[:space:]]+(write|readwrite)[[:space:]]+([^[:space:]]+/)?fl/%u/batch[[:space:]]*$' "$ACL"; then
    die "$ACL has no 'pattern write fl/%u/batch' line: the gateway could not publish; install $HERE/fieldlink.acl"
fi

# --- password ------------------------------------------------------------------------
DIR=$(dirname "$PASSWD")
[ -d "$DIR" ] || die "no directory $DIR for the password file"
# One change at a time: mosquitto_passwd rewrites the file in place.
exec 9<"$DIR"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi
if [ ! -e "$PASSWD" ]; then
    : >"$PASSWD"
    restrict "$PASSWD"
fi

if cut -d: -f1 "$PASSWD" | grep -Fxq -- "$USERNAME"; then
    EXISTS=yes
else
    EXISTS=no
fi

PRINT=no
if [ -n "$PASSWORD_FILE" ]; then
    [ -r "$PASSWORD_FILE" ] || die "cannot read --password-file $PASSWORD_FILE"
    PASSWORD=$(head -n 1 "$PASSWORD_FILE")
    [ -n "$PASSWORD" ] || die "--password-file $PASSWORD_FILE is empty"
elif [ "$EXISTS" = yes ] && [ "$ROTATE" = no ]; then
    echo "add-gateway: $USERNAME is already in $PASSWD; unchanged (--rotate sets a new password)" >&2
    PASSWORD=
else
    # 32 characters of base64 without '/', '+', '=': 190 bits, and safe in TOML and env files.
    PASSWORD=$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n' | cut -c 1-32)
    PRINT=yes
fi

if [ -n "$PASSWORD" ]; then
    # Through stdin, twice (its prompt and confirmation), not -b: a command line is
    # visible to every user in ps.
    printf '%s\n%s\n' "$PASSWORD" "$PASSWORD" | mosquitto_passwd "$PASSWD" "$USERNAME" >/dev/null ||
        die "mosquitto_passwd failed for $USERNAME in $PASSWD"
    restrict "$PASSWD"
    if [ "$EXISTS" = yes ]; then
        echo "add-gateway: new password for $USERNAME in $PASSWD" >&2
    else
        echo "add-gateway: added $USERNAME to $PASSWD" >&2
    fi
    if [ "$PRINT" = yes ]; then
        printf '%s\n' "$PASSWORD"
        cat >&2 <<EOF
add-gateway: the password is on stdout, shown this once. In the gateway's config:
  [uplink]
  url = "mqtts://<this broker>:8883"
  username = "$USERNAME"
  password = "\${FIELDLINK_UPLINK_PASSWORD}"   # the password, in /etc/fieldlink/gateway.env
EOF
    fi
fi

if [ "$RELOAD" = yes ]; then
    systemctl reload mosquitto || die "systemctl reload mosquitto failed"
    echo "add-gateway: mosquitto reloaded" >&2
elif [ -n "$PASSWORD" ]; then
    echo "add-gateway: run 'systemctl reload mosquitto' (or use --reload) for the change to apply" >&2
fi
