/* A tiny AF_VSOCK client/server the virtio end-to-end test compiles (gcc -static) and puts on
 * the guest's disk: busybox has no vsock tool.
 *   vsock connect CID PORT MSG   connect, send "MSG\n", print "REPLY <line>"
 *   vsock serve PORT             accept one connection, answer "echo <line>\n"
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <linux/vm_sockets.h>

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) break;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    char line[256];
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    if (argc == 5 && !strcmp(argv[1], "connect")) {
        a.svm_cid = (unsigned)atoi(argv[2]);
        a.svm_port = (unsigned)atoi(argv[3]);
        if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); return 1; }
        dprintf(s, "%s\n", argv[4]);
        read_line(s, line, sizeof line);
        printf("REPLY %s\n", line);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "serve")) {
        a.svm_cid = VMADDR_CID_ANY;
        a.svm_port = (unsigned)atoi(argv[2]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("bind"); return 1; }
        if (listen(s, 1) < 0) { perror("listen"); return 1; }
        printf("LISTENING %s\n", argv[2]);
        fflush(stdout);
        int c = accept(s, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        read_line(c, line, sizeof line);
        dprintf(c, "echo %s\n", line);
        close(c);
        printf("SERVED %s\n", line);
        return 0;
    }
    fprintf(stderr, "usage: vsock connect CID PORT MSG | vsock serve PORT\n");
    return 2;
}
